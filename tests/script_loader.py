"""`load_script`: an example or benchmark script of the repository, imported as a module by its path."""

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """The script at `REPO_ROOT / relative_path` as a module named after its file; its folder is on `sys.path`
    while it loads (benchmarks import their siblings)."""
    path = REPO_ROOT / relative_path
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)
