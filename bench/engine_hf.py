"""Engine process for `decode.py`: Hugging Face transformers (torch, CPU, bf16) on a synthetic HF checkpoint.

    python bench/engine_hf.py SPEC_JSON

The same spec, prompts, chunked prefill and timing rules as `engine_ours.py`; transformers decodes the
MXFP4 experts to bf16 itself while loading. Prints its figures as one JSON line on stdout.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import torch
import transformers

import workload


def _argmax(logits_BTV: torch.Tensor) -> torch.Tensor:
    return logits_BTV[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def generate(model: transformers.GptOssForCausalLM, prompts: list[list[int]], new_tokens: int) -> workload.Run:
    tokens_BT, cache = torch.tensor(prompts), None
    start = time.perf_counter()
    for chunk in range(0, tokens_BT.shape[1], workload.PREFILL_CHUNK):
        out = model(input_ids=tokens_BT[:, chunk : chunk + workload.PREFILL_CHUNK], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    token_B1 = _argmax(out.logits)
    first_token_at, prefill, first_tokens = time.time(), time.perf_counter() - start, token_B1[:, 0].tolist()
    step_ends = []
    for _ in range(new_tokens - 1):
        token_B1 = _argmax(model(input_ids=token_B1, past_key_values=cache, use_cache=True).logits)
        step_ends.append(time.perf_counter())
    held = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return workload.Run(
        prefill=prefill,
        first_step=step_ends[0] - start - prefill,
        decode=step_ends[-1] - step_ends[0],
        decode_steps=len(step_ends) - 1,
        first_tokens=first_tokens,
        first_token_at=first_token_at,
        cache_bytes=sum(t.numel() * t.element_size() for t in held),
    )


def main(spec: dict) -> dict:
    start = time.perf_counter()
    model = transformers.GptOssForCausalLM.from_pretrained(
        spec["checkpoint"], quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    ).eval()
    load_s = time.perf_counter() - start
    print(f"transformers: loaded in {load_s:.1f} s ({model.config._attn_implementation} attention)", file=sys.stderr, flush=True)
    figures = workload.measure("transformers", functools.partial(generate, model), model.config.vocab_size, spec)
    return {"load_s": load_s, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), **figures}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
