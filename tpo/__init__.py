"""Task Preference Optimization for Hugging Face vision-language models.

The package installs the repository's folders under one namespace: `tpo.modeling_tpo`,
`tpo.processing`, `tpo.training`.

The model classes below are imported on first access (PEP 562), so that `import tpo.training.metrics`
(the scoring CLI) does not pay for torch and transformers.
"""

__version__ = "0.1.0"

_MODEL_EXPORTS = ("ROUTER_CLASSES", "TASK_NAMES", "TPOConfig", "TPOForConditionalGeneration", "TPOOutput")

__all__ = [*_MODEL_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        from . import modeling_tpo

        return getattr(modeling_tpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
