"""TPO modeling: configuration, model, heads, losses. Self-contained (relative imports only) so
that `save_pretrained` copies it next to checkpoints as remote code."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_tpo import (
    IGNORE_INDEX,
    ROUTER_CLASSES,
    TASK_NAMES,
    BoxPromptConfig,
    MaskHeadConfig,
    RegionHeadConfig,
    TemporalHeadConfig,
    TPOConfig,
)
from .modeling_tpo import TPOForConditionalGeneration, TPOOutput, TPOPreTrainedModel

AutoConfig.register("tpo", TPOConfig, exist_ok=True)
AutoModel.register(TPOConfig, TPOForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(TPOConfig, TPOForConditionalGeneration, exist_ok=True)

__all__ = [
    "BoxPromptConfig",
    "IGNORE_INDEX",
    "MaskHeadConfig",
    "RegionHeadConfig",
    "TemporalHeadConfig",
    "ROUTER_CLASSES",
    "TASK_NAMES",
    "TPOConfig",
    "TPOForConditionalGeneration",
    "TPOOutput",
    "TPOPreTrainedModel",
]
