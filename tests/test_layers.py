"""The import layering (`.importlinter`): kept by the tree, and broken by one upward import."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dsjax", "experiments", "configs")


def _lint(root):
    # PYTHONPATH first: grimp must read this tree's packages, not an installed copy.
    env = dict(os.environ, PYTHONPATH=root)
    lint_imports = os.path.join(os.path.dirname(sys.executable), "lint-imports")  # import-linter's CLI
    return subprocess.run([lint_imports, "--config", os.path.join(root, ".importlinter")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(tmp_path):
    for package in PACKAGES:
        shutil.copytree(os.path.join(ROOT, package), tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, bad_import, contract", [
    ("dsjax/model/params.py", "from dsjax.train import loop", "Layers"),        # model reaching up to train
    ("dsjax/parallel/mesh.py", "import dsjax.model.transformer", "Layers"),    # parallel must not know the model
    ("dsjax/model/norms.py", "import dsjax.model.transformer", "No import cycles"),  # a cycle inside model
])
def test_an_upward_import_breaks_a_contract(tmp_path, module, bad_import, contract):
    root = _copy_tree(tmp_path)
    with open(root / module, "a") as f:
        f.write(f"\n{bad_import}  # noqa: E402,F401\n")
    result = _lint(str(root))
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if "BROKEN" in line or contract in line]
    assert any(contract in line for line in broken), result.stdout
