"""bench/decode.py: end to end on the tiny preset beside transformers, and its measuring parts against known figures;
bench/cpu_kernels.py on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the bench scripts import their siblings as top-level modules

import cpu_kernels  # noqa: E402
import decode  # noqa: E402
import llama_cpp  # noqa: E402
import peers  # noqa: E402
import profile_step  # noqa: E402
import roofline  # noqa: E402

from gptoss_jax import GptOssConfig  # noqa: E402

TINY = GptOssConfig.tiny()


@pytest.mark.slow
def test_tiny_beside_transformers(tmp_path):
    out = tmp_path / "figures.json"
    argv = [sys.executable, str(BENCH / "decode.py"), "--preset", "tiny", "--prompts", "16", "--batches", "2", "--new-tokens", "3",
            "--compare", "hf", "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    figures = json.loads(out.read_text())
    assert figures["peer_name"] == "transformers" and figures["peer_skipped"] is None
    for engine in ("ours", "peer"):
        result = figures[engine]
        (case,) = result["cases"]
        assert (case["prompt"], case["batch"], case["new_tokens"]) == (16, 2, 3)
        assert case["prefill_tokens_per_s"] > 0 and case["decode_tokens_per_s"] > 0
        # The first token needs the imports, the load and the first (compiling) prefill, all inside the process's wall time.
        assert result["load_s"] + case["prefill_compile_s"] < result["ttft_s"] < result["wall_s"]
        assert result["peak_rss_bytes"] > result["param_bytes"]  # the process held its parameters
    # Same weights and prompts on both sides: greedy first tokens agree (a different token means the
    # engines did not run the same model; fixed seeds, so this does not flake).
    assert figures["ours"]["cases"][0]["first_tokens"] == figures["peer"]["cases"][0]["first_tokens"]
    # transformers holds the experts decoded to bf16: exactly what the fit check assumes.
    assert figures["peer"]["param_bytes"] == peers.hf_bf16_bytes(TINY)
    # Our KV cache: 2 sliding layers of 8 slots and 2 full ones of 16 + 3 slots; k and v, 2 heads of 16, bf16; int32 lengths.
    assert figures["ours"]["cases"][0]["cache_bytes"] == (2 * 8 + 2 * 19) * 2 * (2 * 2 * 16 * 2) + 2 * 4
    assert "greedy first tokens equal to transformers' in 2 of 2 rows" in finished.stdout


def test_llama_cpp_figures_are_read_per_prompt(tmp_path, monkeypatch):
    """What `llama_cpp.run` makes of llama-bench's JSON: a stand-in binary prints records as llama-bench
    does (its field names, one record per test) and echoes its arguments, so the two invocations and
    the per-prompt figures are checked here; building and running llama.cpp itself is `decode.py`'s job."""
    fake = tmp_path / "llama-bench"
    fake.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
value = lambda flag: [int(v) for v in args[args.index(flag) + 1].split(",")]
records = [{{"n_prompt": p, "n_gen": n, "n_depth": d, "avg_ts": 1000.0 * p + 10.0 * d + n}}
           for p in value("-p") for n in value("-n") for d in (value("-d") if "-d" in args else [0])]
json.dump(records, sys.stdout)
""")
    fake.chmod(0o755)
    monkeypatch.setattr(llama_cpp, "llama_bench", lambda work_dir: fake)
    monkeypatch.setattr(llama_cpp, "gguf_file", lambda checkpoint: tmp_path / "model.gguf")
    result = llama_cpp.run(tmp_path, tmp_path / "ckpt", {"prompts": [16, 512], "new_tokens": 7, "repeats": 1})
    assert [(c["prompt"], c["batch"]) for c in result["cases"]] == [(16, 1), (512, 1)]
    assert [c["prefill_tokens_per_s"] for c in result["cases"]] == [16000.0, 512000.0]  # -p P -n 0
    assert [c["decode_tokens_per_s"] for c in result["cases"]] == [167.0, 5127.0]  # -p 0 -n 7 -d P
    assert result["peak_rss_bytes"] > 0


def test_peak_rss_is_the_commands_own():
    """A 300 MB child of a process holding 512 MiB reports about 300 MB (Linux carries peak RSS across exec)."""
    held = np.ones(2**26)  # 512 MiB, touched
    finished = peers.run([sys.executable, "-c", "x = bytearray(300_000_000); print(len(x))"])
    assert finished.returncode == 0 and finished.stdout == "300000000\n" and held.sum() == 2**26
    assert 300e6 < finished.peak_rss_bytes < 300e6 + 100e6  # + the interpreter (about 10 MB)


def test_transformers_memory_estimate_matches_the_published_count():
    """SPEC 1.1: gpt-oss-20b has 20,914,757,184 parameters, 2 bytes each once dequantized to bf16."""
    assert peers.hf_bf16_bytes(GptOssConfig.gpt_oss_20b()) == 2 * 20_914_757_184
    problem = peers.hf_problem(GptOssConfig.gpt_oss_120b())  # 234 GB: no machine running this suite has that
    assert problem is not None and ("--layers" in problem or "no depth fits" in problem)
    assert peers.hf_problem(TINY) is None


def test_decode_bytes_per_step():
    config = GptOssConfig.gpt_oss_20b()
    model = roofline.abstract_model(config, "mxfp4")
    # SPEC 1.1: past the 128-token window only the 12 full layers grow, 24 KiB per token.
    grown = roofline.decode_bytes_per_step(model, 1, 1000) - roofline.decode_bytes_per_step(model, 1, 500)
    assert grown == 500 * 24 * 1024
    assert roofline.experts_touched(config, 1) == pytest.approx(4)  # one token picks 4 of 32 experts
    assert roofline.experts_touched(config, 10_000) == pytest.approx(32)
    # SPEC 1.1: 3.61 B active parameters per token (embedding not counted); of them the 4 experts' weights
    # (24 layers x 4 x 2880 x (5760 + 2880)) are packed at 4.25 bits, the rest bf16. rel 0.5%: SPEC rounds
    # to 10 M parameters (0.3%), and the one embedding row and one token of KV are 0.01%.
    expert_weights = 24 * 4 * 2880 * (5760 + 2880)
    expected = 2 * (3.61e9 - expert_weights) + 4.25 / 8 * expert_weights
    assert roofline.decode_bytes_per_step(model, 1, 1) == pytest.approx(expected, rel=5e-3)


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    assert decode.main(["--preset", "tiny", "--prompts", "2000", "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exceed the context of 1024" in err
    assert decode.main(["--checkpoint", str(tmp_path), "--compare", "hf"]) == 2
    assert "need --preset" in capsys.readouterr().err
    assert decode.main(["--preset", "tiny", "--prompts", "16", "--compare", "no-such-engine --fast"]) == 2
    assert "'no-such-engine' not found" in capsys.readouterr().err
    assert not (tmp_path / "tiny-4layers").exists()  # nothing written before the input is checked
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors
        decode.main(["--preset", "tiny", "--layers", "two"])
    assert exit_.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_profile_step_lists_the_steps_ops(mode, capsys):
    assert profile_step.main(["--preset", "tiny", "--layers", "1", "--mode", mode, "--tokens", "16", "--top", "50"]) == 0
    out = capsys.readouterr().out
    assert f"{mode} step, tiny cut to 1 layers" in out
    assert "ThunkExecutor::Execute" in out and "$" not in out  # XLA's spans, no Python frames


def test_cpu_kernels_times_each_kernel_at_each_level(tmp_path, capsys):
    from gptoss_jax import native

    assert cpu_kernels.main(["--preset", "tiny", "--layers", "2", "--runs", "1", "--json", str(tmp_path / "k.json")]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    kernels = ["mxfp4 mlp1", "mxfp4 mlp2", "bf16 q", "bf16 out", "attn 544", "attn 4096"]
    assert [(r["kernel"], r["level"]) for r in rows] == [(k, level) for k in kernels for level in native.runnable_levels()]
    assert all(r["bytes_per_s"] > 0 for r in rows) and "of read bw" in capsys.readouterr().out
