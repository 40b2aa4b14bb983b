"""The tutorials in tutorials/*.ipynb run top to bottom in a fresh kernel, and the copies in the
repository carry the outputs of such a run (issue 7)."""
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

TUTORIALS = pathlib.Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = [
    "01_whirlwind_tour",
    "02_per_sample_gradients",
    "03_model_ensembling",
    "04_jacobians_hessians",
    "05_neural_tangent_kernels",
    "06_maml",
    "07_dp_sgd",
    "08_control_flow_and_custom_derivatives",
    "09_named_axes",
]
CELL_TIMEOUT_S = 120

# Appended to every run: a notebook must leave no transform level behind, like every test here.
LEVEL_STACK_CHECK = (
    "from functransforms.core.levels import level_stack\n"
    "assert level_stack() == [], f'level stack left dirty: {level_stack()}'"
)


@pytest.fixture(scope="module")
def kernel_name():
    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True)
    return "python3"


def test_every_tutorial_is_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebook_was_run_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    source = "\n".join(c.source for c in code)
    assert "import functransforms as ft" in source
    # torch.func appears only as the reference the results are compared with.
    assert "from torch.func import" not in source and "import functorch" not in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_name, monkeypatch):
    # The kernel inherits this environment: default sizes, and one thread so that the notebooks
    # do not fight over the few cores of a CI machine.
    monkeypatch.delenv("FT_TUTORIAL_SCALE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel must import this checkout's functransforms, not whichever one is installed.
    repo = str(TUTORIALS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(LEVEL_STACK_CHECK))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()
