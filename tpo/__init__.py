"""Task Preference Optimization for Hugging Face vision-language models.

`tpo.modeling_tpo`, `tpo.processing` and `tpo.training` are the repository's top-level folders, mapped into
this namespace by the installation (README.md, "Layout"). The model classes below are imported on first
access (PEP 562), so that `import tpo.training.metrics` (the scoring CLI) does not pay for torch and
transformers.
"""

from importlib.util import find_spec as _find_spec

__version__ = "0.1.0"

_SUBPACKAGES = ("modeling_tpo", "processing", "training")
_MODEL_EXPORTS = ("ROUTER_CLASSES", "TASK_NAMES", "TPOConfig", "TPOForConditionalGeneration", "TPOOutput")

__all__ = [*_MODEL_EXPORTS, "__version__"]

_unmapped = [name for name in _SUBPACKAGES if _find_spec(f"{__name__}.{name}") is None]
if _unmapped:
    raise ImportError(
        f"`tpo` was found at {__path__[0]}, but not {', '.join(f'tpo.{name}' for name in _unmapped)}: the project's "
        f"folders (modeling_tpo/, processing/, training/) become `tpo.*` only once the project is installed. "
        f"Run `pip install -e .` in the repository root (README.md, \"Layout\")."
    )


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        from . import modeling_tpo

        return getattr(modeling_tpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
