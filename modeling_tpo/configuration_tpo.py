"""Configuration of a TPO model: an existing transformers vision-language model plus task heads.

This file is copied next to saved checkpoints as remote code: relative imports only, nothing
optional imported at module level.
"""

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Router classes, in the order of the router's logits. The ids are fixed whatever tasks are
# enabled, so `task_labels` mean the same thing for every TPO model.
ROUTER_CLASSES = ("text", "temporal", "region", "mask")
TASK_NAMES = ROUTER_CLASSES[1:]
IGNORE_INDEX = -100

# Token strings; the release names the region, temporal and tracking tokens the same way.
DEFAULT_BEGIN_TOKENS = {"temporal": "<time_begin>", "region": "<box_begin>", "mask": "<mask_begin>"}
DEFAULT_SLOT_TOKENS = {"temporal": "<temp>", "region": "<boxes>", "mask": "<masks>"}

# Head defaults: the project's own choices. Where they differ from the public release (REFERENCE.md section 2),
# `PRESETS["release"]` below switches to the release and README.md ("Differences from the paper and the release")
# lists every difference with the option that switches it.
# - region: 2-layer MLP hidden -> hidden/2 -> 4 ("mlp"; "heatmap" is our soft-argmax variant over the visual
#   tokens, for MLLMs trained from scratch, with a heatmap KL term `heatmap_weight`); loss 2 * L1 + GIoU / 5. Ours
#   regresses sigmoid (cx, cy, w, h) with the L1 summed over the 4 coordinates ("cxcywh_sigmoid", "coordinate_sum");
#   the release regresses raw (x0, y0, x1, y1) with the L1 averaged over N x 4 ("xyxy_raw", "mean").
# - temporal: DETR moment localiser, 10 moment queries, matching costs span L1 10, gIoU 1, class 4; loss weights
#   span L1 10, gIoU 1, CE 4 (no-object weight 0.1), saliency 4, the whole temporal sum scaled by 0.05
#   (`loss_weights["temporal"]`). Ours: span L1 summed over (centre, width) ("coordinate_sum"), the CE a weighted
#   mean divided by the sum of the class weights ("weight_normalised"), ranking + contrastive saliency ("ranking"),
#   2 + 2 plain layers. CG-DETR's query-aware parts (dummy tokens, text-to-video layers, reference points, input
#   dropout) are off by default and on in the release preset. `decoder="dense"` is our frame-anchored alternative,
#   fast to train from scratch. `dense_clip_seconds` > 0 reads per-clip features from the MLLM's vision tower
#   (frozen) at that rate instead of only the LLM's frames (see `TemporalHead` and README "Dense temporal features").
# - mask: task embedding -> MLP hidden -> hidden -> K x prompt_dim sparse SAM2 prompts (K=3). Ours trains BCE + Dice
#   on the masks (weights as LISA: BCE 2.0, Dice 0.5) and SAM2's mask decoder; the release freezes all of SAM2 and
#   trains only an L1 to SAM2's prompt embedding of the GT box plus an L1 on a box (`prompt_l1_weight`,
#   `box_l1_weight`, 0 here).
# The one definition of each head's defaults: the head classes' constructors take theirs from these dicts.
DEFAULT_REGION_HEAD = {"mode": "mlp", "hidden_ratio": 0.5, "l1_weight": 2.0, "giou_weight": 0.2, "heatmap_dim": 256,
                       "heatmap_weight": 1.0, "box_format": "cxcywh_sigmoid", "l1_reduction": "coordinate_sum",
                       "heatmap_score": "additive", "query_text": False}
DEFAULT_TEMPORAL_HEAD = {
    "d_model": 256,
    "num_heads": 8,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "dim_feedforward": 1024,
    "dropout": 0.1,
    "num_queries": 10,
    "max_frames": 512,
    "use_query_tokens": True,
    "aux_loss": True,
    "span_l1_weight": 10.0,
    "span_giou_weight": 1.0,
    "label_weight": 4.0,
    "saliency_weight": 4.0,
    "eos_coef": 0.1,
    "saliency_margin": 0.2,
    "saliency_loss": "ranking",
    "match_cost_span": 10.0,
    "match_cost_giou": 1.0,
    "match_cost_class": 4.0,
    "frame_pooling": "mean_max",
    "decoder": "detr",
    "nms_iou": 0.7,
    "span_l1_reduction": "coordinate_sum",
    "label_reduction": "weight_normalised",
    "num_dummies": 0,
    "dummy_layers": 2,
    "t2v_layers": 0,
    "t2v_saliency_weight": 1.0,
    "negative_pairs": False,
    "reference_points": False,
    "input_dropout": 0.0,
    "dense_clip_seconds": 0.0,
    "dense_max_clips": 256,
}
DEFAULT_MASK_HEAD = {
    "num_prompt_tokens": 3,
    "bce_weight": 2.0,
    "dice_weight": 0.5,
    "prompt_l1_weight": 0.0,
    "box_l1_weight": 0.0,
    "freeze_image_encoder": True,
    "freeze_prompt_encoder": True,
    "freeze_mask_decoder": False,
    "multimask_output": False,
    # SAM2's fallback, at inference, from its single mask to the best of its 3 multimask outputs when the single
    # mask is unstable: None follows `freeze_mask_decoder` (on for a frozen pretrained decoder, as released; off
    # for a decoder trained here on the single mask only, whose multimask outputs stay untrained)
    "stability_fallback": None,
    "box_prompt": False,  # not in the release: a localised box as an extra SAM2 prompt (see mask_head.py)
    "box_prompt_config": None,
    "box_loss_weight": 1.0,
}
# `pipeline(model=checkpoint, trust_remote_code=True)`: the config names the pipeline class, whose file
# (pipeline_tpo.py) the processor saves with its own code
CUSTOM_PIPELINES = {"tpo": {"impl": "pipeline_tpo.TPOPipeline", "pt": ["AutoModel"], "type": "multimodal"}}
DEFAULT_LOSS_WEIGHTS = {"lm": 1.0, "assign": 1.0, "temporal": 0.05, "region": 1.0, "mask": 1.0}

# Named sets of settings, applied over the defaults and under what the caller gives (`TPOConfig(preset=...)`).
# "release": the public VideoChat-TPO release (REFERENCE.md section 2): heads, loss reductions and weights, CG-DETR's
# query-aware temporal parts at its depth (3 + 3), SAM2 frozen with only the prompt-embedding and box L1s, and no
# auxiliary router loss (the release routes by the begin token the LM emits; so does our generation).
PRESETS = {
    "release": {
        "region_head_config": {"mode": "mlp", "box_format": "xyxy_raw", "l1_reduction": "mean", "l1_weight": 2.0,
                               "giou_weight": 0.2},
        "temporal_head_config": {
            "decoder": "detr", "d_model": 256, "num_heads": 8, "num_encoder_layers": 3, "num_decoder_layers": 3,
            "dim_feedforward": 1024, "dropout": 0.1, "num_queries": 10, "aux_loss": True, "frame_pooling": "mean",
            "span_l1_weight": 10.0, "span_giou_weight": 1.0, "label_weight": 4.0, "saliency_weight": 4.0,
            "eos_coef": 0.1, "saliency_margin": 0.2, "saliency_loss": "release", "match_cost_span": 10.0,
            "match_cost_giou": 1.0, "match_cost_class": 4.0, "span_l1_reduction": "mean", "label_reduction": "mean",
            "num_dummies": 45, "dummy_layers": 2, "t2v_layers": 2, "t2v_saliency_weight": 1.0, "negative_pairs": True,
            "reference_points": True, "input_dropout": 0.5, "dense_clip_seconds": 2.0,
        },
        "mask_head_config": {"freeze_image_encoder": True, "freeze_prompt_encoder": True, "freeze_mask_decoder": True,
                             "bce_weight": 0.0, "dice_weight": 0.0, "prompt_l1_weight": 1.0, "box_l1_weight": 1.0,
                             "box_prompt": False},
        "loss_weights": {"lm": 1.0, "assign": 0.0, "temporal": 0.05, "region": 1.0, "mask": 1.0},
    },
}


def _merge_defaults(name: str, defaults: dict, given: dict | None, preset: dict | None = None) -> dict:
    """Fill `given` with `preset`, then `defaults`, refusing keys the defaults do not know (likely typos)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in `{name}`; valid keys are {sorted(defaults)}.")
    return {**copy.deepcopy(defaults), **copy.deepcopy(preset or {}), **given}


def _attention_implementations(config) -> dict | None:
    """{sub-config path: `_attn_implementation`} of a config and its sub-configs, if any is set."""
    if not isinstance(config, PreTrainedConfig):
        return None
    found = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            found.update({f"{key}.{k}".rstrip("."): v for k, v in (_attention_implementations(sub) or {}).items()})
    return found if any(v is not None for v in found.values()) else None


def _restore_attention_implementations(config, kept: dict) -> None:
    for path, value in kept.items():
        target = config
        for key in filter(None, path.split(".")):
            target = getattr(target, key)
        target._attn_implementation_internal = value


def default_task_token_strings(num_task_tokens: int = 1) -> dict[str, dict[str, Any]]:
    """Token strings for every task: one begin token and `num_task_tokens` slot tokens.

    >>> default_task_token_strings(2)["region"]
    {'begin': '<box_begin>', 'slots': ['<boxes>', '<boxes_1>']}
    """
    strings = {}
    for task in TASK_NAMES:
        slot = DEFAULT_SLOT_TOKENS[task]
        slots = [slot] + [f"{slot[:-1]}_{i}>" for i in range(1, num_task_tokens)]
        strings[task] = {"begin": DEFAULT_BEGIN_TOKENS[task], "slots": slots}
    return strings


class TPOConfig(PreTrainedConfig):
    r"""
    Configuration of [`TPOForConditionalGeneration`].

    Args:
        mllm_config (`dict` or `PreTrainedConfig`):
            Configuration of the wrapped vision-language model: any `model_type` that `AutoConfig`
            knows and `AutoModelForImageTextToText` can build (LLaVA, LLaVA-OneVision, Qwen2-VL, ...).
        sam2_config (`dict` or `PreTrainedConfig`, *optional*):
            SAM2 configuration (`sam2_video` model type) for the mask head. Required when `"mask"`
            is an enabled task; a default SAM2 configuration is created if none is given.
        tasks (`list[str]`, defaults to `["temporal", "region", "mask"]`):
            Enabled tasks, a subset of `temporal`, `region`, `mask`. Heads exist only for these.
        num_task_tokens (`int`, defaults to 1):
            Learnable task tokens (slot tokens) per task.
        task_token_strings (`dict`, *optional*):
            `{task: {"begin": str, "slots": [str, ...]}}` for every task (enabled or not), so that
            the vocabulary is the same whatever tasks a model enables.
        task_token_ids (`dict`, *optional*):
            `{task: {"begin": int, "slots": [int, ...]}}`, the ids of those tokens. Filled by
            [`TPOForConditionalGeneration.from_mllm`]; required to build a model.
        router_hidden_size (`int`, *optional*):
            Hidden width of the task router MLP; `None` gives a single linear layer.
        region_head_config, temporal_head_config, mask_head_config (`dict`, *optional*):
            Head settings and their internal loss weights; defaults in `DEFAULT_*_HEAD`.
        loss_weights (`dict`, *optional*):
            Weights of `lm`, `assign`, `temporal`, `region` and `mask` in the total loss.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the heads' weight initialisation.
        preset (`str`, *optional*):
            A named set of head settings and loss weights from `PRESETS` (`"release"`: the public VideoChat-TPO
            release), applied over the defaults; the head configs and loss weights given here override it key by key.
        labelled_logits_only (`bool`, defaults to `False`):
            With `labels`, compute the LM logits only at the positions that predict a label (the answers), not at
            every position: the LM loss is the same, and `logits` is then `(num_labelled_positions, vocab)`. The
            full `(batch, seq, vocab)` logits cost about 12 bytes x vocab per token in training (bf16 logits, their
            float32 copy in the loss and its gradient: 1.8 MB per token for a 152k vocabulary, far more than the
            rest of a checkpointed 7 B step; see the README's memory model).
    """

    model_type = "tpo"
    sub_configs_defaults = {
        "mllm_config": SubConfigSpec(config_class=AutoConfig, model_type="llava"),
        "sam2_config": SubConfigSpec(config_class=AutoConfig, model_type="sam2_video", optional=True),
    }

    mllm_config: dict | PreTrainedConfig | None = None
    sam2_config: dict | PreTrainedConfig | None = None
    tasks: list[str] | tuple[str, ...] | None = None
    num_task_tokens: int = 1
    task_token_strings: dict | None = None
    task_token_ids: dict | None = None
    router_hidden_size: int | None = None
    region_head_config: dict | None = None
    temporal_head_config: dict | None = None
    mask_head_config: dict | None = None
    loss_weights: dict | None = None
    initializer_range: float = 0.02
    preset: str | None = None
    labelled_logits_only: bool = False

    def __post_init__(self, **kwargs):
        self.tasks = list(TASK_NAMES if self.tasks is None else self.tasks)
        unknown = [task for task in self.tasks if task not in TASK_NAMES]
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown} in `tasks`; valid tasks are {list(TASK_NAMES)}.")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"`tasks` lists a task twice: {self.tasks}.")
        # Canonical order, so that two configs with the same tasks are equal.
        self.tasks = [task for task in TASK_NAMES if task in self.tasks]
        if self.num_task_tokens < 1:
            raise ValueError(f"`num_task_tokens` must be at least 1, got {self.num_task_tokens}.")
        if "mask" in self.tasks and self.sam2_config is None:
            self.sam2_config = CONFIG_MAPPING["sam2_video"]()
        # The base class sets `_attn_implementation` (None unless asked) on every sub-config; an
        # MLLM config taken from a built model already carries its own, which must survive.
        kept = None if "attn_implementation" in kwargs else _attention_implementations(self.mllm_config)
        super().__post_init__(**kwargs)
        if kept:
            _restore_attention_implementations(self.mllm_config, kept)

        # Every auto class this checkpoint answers to (save_pretrained adds only the last registered).
        auto_map = dict(getattr(self, "auto_map", None) or {})
        auto_map.setdefault("AutoConfig", "configuration_tpo.TPOConfig")
        auto_map.setdefault("AutoModel", "modeling_tpo.TPOForConditionalGeneration")
        auto_map.setdefault("AutoModelForImageTextToText", "modeling_tpo.TPOForConditionalGeneration")
        self.auto_map = auto_map

        if self.task_token_strings is None:
            self.task_token_strings = default_task_token_strings(self.num_task_tokens)
        self._check_token_table("task_token_strings", self.task_token_strings, str)
        if self.task_token_ids is not None:
            self.task_token_ids = {
                task: {"begin": int(ids["begin"]), "slots": [int(i) for i in ids["slots"]]}
                for task, ids in self.task_token_ids.items()
            }
            self._check_token_table("task_token_ids", self.task_token_ids, int)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"Unknown `preset` {self.preset!r}; valid presets are {sorted(PRESETS)} (or None for the "
                             "project's defaults).")
        preset = PRESETS.get(self.preset, {})
        for name, defaults in (("region_head_config", DEFAULT_REGION_HEAD), ("temporal_head_config", DEFAULT_TEMPORAL_HEAD),
                               ("mask_head_config", DEFAULT_MASK_HEAD), ("loss_weights", DEFAULT_LOSS_WEIGHTS)):
            setattr(self, name, _merge_defaults(name, defaults, getattr(self, name), preset.get(name)))

    def _check_token_table(self, name: str, table: dict, value_type: type) -> None:
        missing = [task for task in TASK_NAMES if task not in table]
        unknown = [task for task in table if task not in TASK_NAMES]
        if missing or unknown:
            raise ValueError(
                f"`{name}` must have one entry per task {list(TASK_NAMES)}; missing {missing}, unknown {unknown}."
            )
        for task, entry in table.items():
            if set(entry) != {"begin", "slots"}:
                raise ValueError(f"`{name}[{task!r}]` must have exactly the keys 'begin' and 'slots', got {sorted(entry)}.")
            values = [entry["begin"], *entry["slots"]]
            if not all(isinstance(v, value_type) for v in values):
                raise ValueError(f"`{name}[{task!r}]` must hold {value_type.__name__} values, got {entry}.")
            if len(entry["slots"]) != self.num_task_tokens:
                raise ValueError(
                    f"`{name}[{task!r}]` has {len(entry['slots'])} slot token(s) but `num_task_tokens` is "
                    f"{self.num_task_tokens}."
                )
        flat = [v for entry in table.values() for v in [entry["begin"], *entry["slots"]]]
        if len(set(flat)) != len(flat):
            raise ValueError(f"`{name}` repeats a token: {table}.")

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The wrapped MLLM's text configuration (generation and embedding resizing read it)."""
        return self.mllm_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def all_task_token_ids(self) -> list[int]:
        """Ids of every begin and slot token, all tasks included."""
        if self.task_token_ids is None:
            return []
        return [v for entry in self.task_token_ids.values() for v in [entry["begin"], *entry["slots"]]]


__all__ = ["TPOConfig"]

TPOConfig.register_for_auto_class()
