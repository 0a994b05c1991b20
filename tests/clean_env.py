"""Run Python in an environment where this project is NOT installed.

The interpreter runs with `-S` (no site-packages, no .pth files) and a PYTHONPATH holding links to
every top-level entry of this environment's site-packages *except* the project's own (`tpo`, its
dist-info and the editable-install finder). What remains is exactly the design card's packages,
so code loaded there with `trust_remote_code=True` proves to be self-contained.
"""

import os
import site
import subprocess
import sys
from pathlib import Path

_PROJECT_ENTRIES = ("tpo", "hf_tpo", "__editable__", "__editable___hf_tpo")


def _site_packages() -> list[Path]:
    paths = [Path(p) for p in site.getsitepackages() if Path(p).is_dir()]
    return [p for p in paths if (p / "transformers").exists()]


def build_clean_path(root: Path) -> Path:
    """A folder of links to site-packages entries, the project's own left out."""
    target = root / "clean_site"
    if target.exists():
        return target
    target.mkdir(parents=True)
    for packages in _site_packages():
        for entry in packages.iterdir():
            if entry.name.startswith(_PROJECT_ENTRIES) or entry.suffix == ".pth":
                continue
            link = target / entry.name
            if not link.exists():
                link.symlink_to(entry)
    return target


def run_clean_python(script: str, root: Path, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter that cannot import the project; raises on failure."""
    clean = build_clean_path(root)
    work = root / "work"
    work.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(clean),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(root / "hf_home"),
        "HF_MODULES_CACHE": str(root / "hf_modules"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if result.returncode != 0:
        raise AssertionError(f"clean-environment script failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
    return result
