"""The sharding of every parameter is a reviewed artifact: changing a rule fails until the table is
regenerated and the diff reviewed. The test only compares; `scripts/update-golden` (which runs this
file as a script) rewrites tests/golden/sharding_*.txt from the code, then review `git diff tests/golden`."""

from pathlib import Path

import pytest
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, sharding

GOLDEN = Path(__file__).parent / "golden"
PRESETS = ["gpt-oss-20b", "gpt-oss-120b"]


def table(preset: str) -> str:
    abstract = nnx.eval_shape(lambda: GptOss(GptOssConfig.from_preset(preset), rngs=nnx.Rngs(0)))
    lines = [f"{'parameter':<38} {'logical axes':<44} {'shape':<34} partition spec"]
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        logical = variable.get_metadata()["out_sharding"]
        shape = variable.get_value().shape
        lines.append(f"{'/'.join(map(str, path)):<38} {str(logical):<44} {str(shape):<34} {sharding.variable_spec(variable)}")
    return "\n".join(lines) + "\n"


def golden(preset: str) -> Path:
    return GOLDEN / f"sharding_{preset}.txt"


@pytest.mark.parametrize("preset", PRESETS)
def test_sharding_table_is_unchanged(preset):
    assert table(preset) == golden(preset).read_text(), "if the change is intended: scripts/update-golden, then review the diff"


if __name__ == "__main__":  # scripts/update-golden
    for preset in PRESETS:
        golden(preset).write_text(table(preset))
        print(f"wrote {golden(preset)}")
