"""The sharding of every parameter is a reviewed artifact: changing a rule fails until the table is
regenerated (`GPTOSS_UPDATE_GOLDEN=1 pytest tests/test_sharding_table.py`) and the diff reviewed."""

import os
from pathlib import Path

import pytest
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, sharding

GOLDEN = Path(__file__).parent / "golden"


def table(preset: str) -> str:
    abstract = nnx.eval_shape(lambda: GptOss(GptOssConfig.from_preset(preset), rngs=nnx.Rngs(0)))
    lines = [f"{'parameter':<38} {'logical axes':<44} {'shape':<34} partition spec"]
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        logical = variable.get_metadata()["out_sharding"]
        shape = variable.get_value().shape
        lines.append(f"{'/'.join(map(str, path)):<38} {str(logical):<44} {str(shape):<34} {sharding.variable_spec(variable)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("preset", ["gpt-oss-20b", "gpt-oss-120b"])
def test_sharding_table_is_unchanged(preset):
    golden = GOLDEN / f"sharding_{preset}.txt"
    if os.environ.get("GPTOSS_UPDATE_GOLDEN"):
        golden.write_text(table(preset))
    assert table(preset) == golden.read_text()
