"""Task Preference Optimization for Hugging Face vision-language models.

The package installs the repository's folders under one namespace: `tpo.modeling_tpo`,
`tpo.processing`, `tpo.training`.
"""

from .modeling_tpo import ROUTER_CLASSES, TASK_NAMES, TPOConfig, TPOForConditionalGeneration, TPOOutput

__version__ = "0.1.0"

__all__ = ["ROUTER_CLASSES", "TASK_NAMES", "TPOConfig", "TPOForConditionalGeneration", "TPOOutput", "__version__"]
