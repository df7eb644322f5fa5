"""`python -m gptoss_jax.sample` end to end, as a user runs it (subprocesses), and its flags (in-process)."""

import json
import subprocess
import sys

import pytest

from convert.__main__ import main as convert_main
from convert.synthetic import write_checkpoint
from gptoss_jax import GptOssConfig, sample


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


@pytest.mark.slow  # a compile of its own (float32, ~3 minutes here); loading is covered by test_convert and test_hostile
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
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ],
    ids=["bad-checkpoint", "prompt-too-long", "bad-top-p"],
)
def test_bad_input_exits_2_with_one_clear_line(capfd, args, message):
    """In-process (the flags are checked before anything compiles); more cases in test_hostile.py."""
    assert sample.main(["--max-new-tokens", "4", *args]) == 2
    lines = [line for line in capfd.readouterr().err.strip().splitlines() if not line.startswith("notice:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_show_reasoning_prints_each_channel_under_its_name(capsys):
    for flags, expected in [([], "answer"), (["--show-reasoning"], "\n[analysis] thinking\n[final] answer")]:
        on_text = sample._printer(sample.parse_args(flags))
        for channel, text in [("analysis", "think"), ("analysis", "ing"), ("final", "answer")]:
            on_text(channel, text)
        assert capsys.readouterr().out == expected


def test_chat_reads_one_message_per_line_until_exit_or_eof(monkeypatch):
    for typed, expected in [(["hi", "more", "exit", "unseen"], ["hi", "more"]), (["one"], ["one"])]:
        lines = iter(typed)
        monkeypatch.setattr("builtins.input", lambda prompt, lines=lines: _next_or_eof(lines))
        assert list(sample._messages(sample.parse_args(["--chat"]))) == expected


def _next_or_eof(lines):
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None


def test_seed_decides_the_sampled_tokens(capsys):
    """In-process, so the three runs share one compile: the same seed repeats, another differs."""
    tokens = []
    for seed in (1, 1, 2):
        assert sample.main(["--json", "--max-new-tokens", "8", "--seed", str(seed), "--prompt", "Hi"]) == 0
        tokens.append(json.loads(capsys.readouterr().out)["tokens"])
    assert tokens[0] == tokens[1] != tokens[2]


def test_json_stays_valid_when_too_few_tokens_to_time_decode():
    result = _run("--json", "--max-new-tokens", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["decode_tokens_per_s"] is None  # not NaN, which is not JSON
