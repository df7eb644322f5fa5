"""`python -m gptoss_jax.sample` end to end, as a user runs it (subprocesses)."""

import json
import subprocess
import sys

import pytest

from convert.__main__ import main as convert_main
from convert.synthetic import write_checkpoint
from gptoss_jax import GptOssConfig


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gptoss_jax.sample", "--max-new-tokens", "4", *args]
    return subprocess.run(command, input=stdin or "", capture_output=True, text=True, timeout=300)


def test_default_run_streams_and_reports_speed():
    result = _run()
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr
    assert "prompt tokens at" in result.stderr.splitlines()[-1] and "decode" in result.stderr.splitlines()[-1]
    assert result.stdout.strip()  # random weights: the raw text of the (malformed) completion is shown


def test_json_output_has_tokens_text_messages_and_speeds():
    result = _run("--json", "--prompt", "Hi there", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["tokens"]) == 4 and isinstance(payload["text"], str) and isinstance(payload["messages"], list)
    assert payload["prefill_tokens_per_s"] > 0 and "decode_tokens_per_s" in payload


@pytest.mark.slow
def test_raw_mode_encodes_the_prompt_as_plain_text():
    result = _run("--raw", "--json", "--prompt", "Once upon a time")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt_tokens"] == 4  # "Once", " upon", " a", " time": no harmony wrapping


def test_converted_checkpoint_runs(tmp_path):
    write_checkpoint(tmp_path / "hf", GptOssConfig.tiny(), layout="hf", seed=3, progress=False)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "converted")]) == 0
    result = _run("--checkpoint", str(tmp_path / "converted"), "--json", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "RANDOM" not in result.stderr and len(json.loads(result.stdout)["tokens"]) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/does/not/exist"], "not a converted gptoss-jax checkpoint"),
        (["--raw", "--prompt", "word " * 1100], "exceeds the context of 1024"),
        (["--reasoning", "extreme"], "invalid choice"),
        (["--top-p", "1.5"], "invalid sampling settings"),
    ],
    ids=["bad-checkpoint", "prompt-too-long", "bad-choice", "bad-top-p"],
)
def test_bad_input_exits_2_with_one_clear_line(args, message):
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_json_stays_valid_when_too_few_tokens_to_time_decode():
    result = _run("--json", "--max-new-tokens", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["decode_tokens_per_s"] is None  # not NaN, which is not JSON
