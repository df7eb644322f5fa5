"""The README's Python snippets run as written (with a converted tiny checkpoint where they load one)."""

import json
import re
from pathlib import Path

import pytest

from convert.__main__ import main as convert_main
from convert.synthetic import write_checkpoint
from gptoss_jax import GptOssConfig

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.slow  # each snippet compiles its own bf16 programs: over 10 minutes on 2 cores
def test_readme_snippets_run(tmp_path, monkeypatch):
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(snippets) == 4
    write_checkpoint(tmp_path / "hf", GptOssConfig.tiny(), layout="hf", progress=False)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "ckpt" / "tiny")]) == 0
    chat = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(chat) + "\n")
    monkeypatch.chdir(tmp_path)
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), {})
