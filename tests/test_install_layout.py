"""`import tpo` from a checkout that is not installed fails with the advice to install it."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_uninstalled_checkout_says_to_pip_install(tmp_path):
    for folder in ("tpo", "modeling_tpo", "processing", "training"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # -I -S: no site-packages, so no installed or editable copy of the project maps the folders into `tpo`
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import tpo.processing"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "pip install -e ." in result.stderr, result.stderr
    assert "tpo.processing" in result.stderr


def test_installed_package_maps_the_folders():
    import tpo
    import tpo.processing
    import tpo.training

    assert Path(tpo.processing.__path__[0]).name == "processing"
    assert Path(tpo.training.__path__[0]).name == "training"
    assert Path(tpo.__file__).parent.name == "tpo"
