"""Every notebook's code cells run top to bottom (without Jupyter)."""

import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, capsys):
    with open(path) as f:
        cells = json.load(f)["cells"]
    namespace = {"__name__": "__notebook__"}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), path, "exec"), namespace)
    assert capsys.readouterr().out.strip()


def test_there_are_notebooks():
    assert NOTEBOOKS
