"""The notebooks: stored clean (default suite), and each one run top to bottom by a real Jupyter kernel (slow).

The kernel is this venv's ipykernel, started by nbclient as Jupyter would start it, in `notebooks/`, so
a notebook that works here works when a reader opens it: no `__file__`, IPython semantics, inline plots.
"""

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

FOLDER = Path(__file__).parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
# Wall-clock budget of each whole notebook, about 3x its runtime on 2 busy CPU cores without a warm
# compilation cache; a notebook not listed gets DEFAULT_BUDGET.
BUDGET_SECONDS = {
    "01_quickstart": 600,
    "02_chat_and_tools": 900,
    "03_sharding_and_memory": 1200,  # tiny on a mesh, six full-size decode steps compiled for memory analysis
    "04_kernels": 1200,  # every Pallas kernel interpreted
    "05_finetune_lora": 1800,
    "06_speed": 3600,  # bench/decode.py writes, converts and loads 2-layer gpt-oss-20b weights in both engines
}
DEFAULT_BUDGET = 900
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read(notebook: Path) -> nbformat.NotebookNode:
    return nbformat.read(notebook, as_version=nbformat.NO_CONVERT)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_is_stored_clean(notebook):
    """Valid nbformat 4, opens with a markdown cell saying what it shows and needs, and carries no outputs
    or execution counts: those hold timings and random-weight text that change on every run (the slow
    test below executes each notebook instead)."""
    nb = read(notebook)
    nbformat.validate(nb)
    assert nb.nbformat == 4, f"{notebook.name}: nbformat {nb.nbformat}"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{notebook.name}: kernelspec is not python3"
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{notebook.name}: the first cell must be markdown"
    assert nb.cells[0].source.lstrip().startswith("# "), f"{notebook.name}: the first cell should open with a # title"
    assert any(cell.cell_type == "code" for cell in nb.cells), f"{notebook.name} has no code cells"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{notebook.name}: cell {index} has stored outputs; clear them before committing"
            assert cell.execution_count is None, f"{notebook.name}: cell {index} has an execution count; clear it"


def test_notebooks_are_numbered():
    assert NOTEBOOKS, "no notebooks found"
    for notebook in NOTEBOOKS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+", notebook.stem), f"{notebook.name}: name it NN_topic.ipynb"


@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec directory holding only `python3`, whose argv is this interpreter (`sys.executable`).

    Why not `python -m ipykernel install --sys-prefix`, or the `python3` that Jupyter finds by default:
    Jupyter searches JUPYTER_PATH, the user's data directory (~/.local/share/jupyter), the environment's
    and the system's, and which comes first depends on jupyter_core's version and on environment
    variables. A `python3` kernelspec left in any of them by another Python would run the notebooks in
    that Python, with other packages (or none). A spec written for `sys.executable` into a directory that
    is the only one searched runs exactly this venv, and the venv itself is not modified.
    """
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / "python3")
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def execute(nb: nbformat.NotebookNode, kernel_specs: KernelSpecManager, budget: float, tmp: Path) -> None:
    """Runs every cell in a fresh kernel started in `notebooks/`; raises on the first failing cell or when
    the whole notebook has run longer than `budget` seconds."""
    env = {**os.environ, "TMPDIR": str(tmp)}  # the notebooks' temporary checkpoints land in pytest's tmp_path
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    deadline = time.monotonic() + budget
    client = NotebookClient(
        nb, km=manager, kernel_name="python3", resources={"metadata": {"path": str(FOLDER)}},
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),  # each cell gets what is left
        startup_timeout=120,
    )
    try:
        client.execute(cleanup_kc=True, env=env)  # cleanup_kc: shut the kernel down although we made its manager
    finally:
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)


def failure(nb: nbformat.NotebookNode, error: Exception) -> str:
    """Which cell failed and its error, without terminal colours."""
    index = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)), None)
    where = f"cell {index}" if index is not None else "a cell"
    return f"{where} failed ({type(error).__name__}):\n{ANSI.sub('', str(error))[-6000:]}"


def test_kernel_is_this_venv_in_the_notebooks_folder(kernel_specs, tmp_path):
    """The machinery the slow test uses, on a two-cell notebook (one kernel start, a few seconds): the
    kernel runs this interpreter, in notebooks/, and a failing cell's error text reaches the test."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())"),
                nbformat.v4.new_code_cell("raise ValueError('seeded failure')")]
    with pytest.raises(CellExecutionError) as caught:
        execute(nb, kernel_specs, 120, tmp_path)
    printed = nb.cells[0].outputs[0].text.split("\n")
    assert Path(printed[0]).resolve() == Path(sys.executable).resolve() and Path(printed[1]).resolve() == FOLDER.resolve(), printed
    assert "cell 1 failed" in failure(nb, caught.value) and "ValueError: seeded failure" in failure(nb, caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_runs(notebook, kernel_specs, tmp_path):
    """Top to bottom in a fresh kernel, within its budget; the executed copy, outputs and all, is kept
    in tmp_path (pytest keeps the last three sessions' under its basetemp) for a reader of the failure."""
    nb = read(notebook)
    budget = BUDGET_SECONDS.get(notebook.stem, DEFAULT_BUDGET)
    executed = tmp_path / notebook.name
    started = time.monotonic()
    try:
        execute(nb, kernel_specs, budget, tmp_path)
    except CellTimeoutError as error:
        pytest.fail(f"{notebook.name}: over its budget of {budget} s; {failure(nb, error)}\n(executed copy: {executed})", pytrace=False)
    except (CellExecutionError, DeadKernelError) as error:
        pytest.fail(f"{notebook.name}: {failure(nb, error)}\n(executed copy: {executed})", pytrace=False)
    finally:
        nbformat.write(nb, executed)
    print(f"{notebook.name}: {time.monotonic() - started:.0f} s under the kernel; executed copy: {executed}")
