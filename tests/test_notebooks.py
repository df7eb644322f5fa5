"""Every notebook's code cells run top to bottom (in-process, as a kernel would run them)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_runs(notebook):
    code = [cell for cell in json.loads(notebook.read_text())["cells"] if cell["cell_type"] == "code"]
    assert code, f"{notebook.name} has no code cells"
    namespace: dict = {}
    for cell in code:  # a cell that raises fails the test
        exec(compile("".join(cell["source"]), str(notebook), "exec"), namespace)
