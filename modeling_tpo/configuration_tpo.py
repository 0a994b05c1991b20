"""Configuration of a TPO model: an existing transformers vision-language model plus task heads.

This file is copied next to saved checkpoints as remote code: relative imports only, nothing
optional imported at module level.
"""

import copy
import dataclasses
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

# Head settings: the project's own choices. Where they differ from the public release (REFERENCE.md section 2),
# `PRESETS["release"]` below switches to the release and README.md ("Differences from the paper and the release")
# lists every difference with the option that switches it.
# The one definition of each head's settings and their defaults is its dataclass below (`RegionHeadConfig`,
# `TemporalHeadConfig`, `MaskHeadConfig`, `BoxPromptConfig`): the heads take an instance, `TPOConfig` keeps the
# same settings as plain dicts (`*_head_config`, in config.json), and `DEFAULT_*_HEAD` are the dataclasses' dicts.


def _refuse_unknown_keys(name: str, given, valid) -> None:
    """Raise a ValueError naming the keys of `given` not in `valid` (likely typos), and the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in `{name}`; valid keys are {sorted(valid)}.")


class _HeadSettings:
    """What the head settings share: building from a dict (or overrides) and refusing keys they do not know."""

    @classmethod
    def check_keys(cls, given, name: str | None = None) -> None:
        """Raise a ValueError naming every key of `given` that is not a setting, and the valid ones."""
        _refuse_unknown_keys(name or cls.__name__, given, [f.name for f in dataclasses.fields(cls)])

    @classmethod
    def build(cls, config=None, name: str | None = None, **overrides):
        """The settings of `config` (an instance, a dict of settings, or None for the defaults) with `overrides`."""
        if config is None:
            given = {}
        elif dataclasses.is_dataclass(config) and not isinstance(config, type):
            # (not isinstance(config, cls): remote code may load this module twice, under two names)
            given = dataclasses.asdict(config)
        elif isinstance(config, dict):
            given = dict(config)
        else:
            raise TypeError(f"`{name or cls.__name__}` must be a {cls.__name__}, a dict or None, got "
                            f"{type(config).__name__}.")
        given.update(overrides)
        cls.check_keys(given, name)
        return cls(**given)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RegionHeadConfig(_HeadSettings):
    """Settings of the region head (`RegionHead`): task embedding -> one normalised box.

    Ours regresses sigmoid (cx, cy, w, h) with the L1 summed over the 4 coordinates; the release regresses raw
    (x0, y0, x1, y1) with the L1 averaged over N x 4. Loss: `l1_weight` * L1 + `giou_weight` * GIoU (2 * L1 + GIoU / 5).
    """

    # "mlp": the release's 2-layer MLP hidden -> hidden * hidden_ratio -> 4 on the task embedding alone; "heatmap":
    # our soft-argmax over the visual tokens scored by the task embedding, for MLLMs trained from scratch
    mode: str = "mlp"
    hidden_ratio: float = 0.5  # the MLP's inner width as a fraction of the LLM's hidden size
    l1_weight: float = 2.0  # weight of the box L1
    giou_weight: float = 0.2  # weight of the box GIoU loss
    heatmap_dim: int = 256  # "heatmap": width of the key / query projections of the visual tokens' scores
    heatmap_weight: float = 1.0  # "heatmap": weight of the KL term from a Gaussian at the GT centre to the scores
    # what the "mlp" mode regresses: "cxcywh_sigmoid" (ours, always a valid box) or "xyxy_raw" (the release)
    box_format: str = "cxcywh_sigmoid"
    # the L1: "coordinate_sum" (ours: summed over the 4 coordinates, mean over boxes) or "mean" (the release: N x 4)
    l1_reduction: str = "coordinate_sum"
    # "heatmap": "additive" scores or "additive_dot" (plus the scaled dot product of the same projections)
    heatmap_score: str = "additive"
    query_text: bool = False  # "heatmap": the instruction's text tokens, attention-pooled, join the query


@dataclasses.dataclass(frozen=True)
class TemporalHeadConfig(_HeadSettings):
    """Settings of the temporal head (`TemporalHead`): a DETR moment localiser over the MLLM's per-frame features.

    Ours: span L1 summed over (centre, width), the CE a weighted mean divided by the sum of the class weights,
    ranking + contrastive saliency, 2 + 2 plain layers. CG-DETR's query-aware parts (dummy tokens, text-to-video
    layers, reference points, input dropout) are off here and on in the release preset. The whole temporal loss is
    scaled by `loss_weights["temporal"]` (0.05).
    """

    d_model: int = 256  # width of the head's transformer
    num_heads: int = 8  # attention heads of every layer
    num_encoder_layers: int = 2  # encoder layers over frames, query text and task embedding
    num_decoder_layers: int = 2  # decoder layers of the moment queries
    dim_feedforward: int = 1024  # feed-forward width of every layer
    dropout: float = 0.1  # dropout inside the layers
    num_queries: int = 10  # moment queries (predicted spans per temporal query)
    max_frames: int = 512  # most frames the head reads
    use_query_tokens: bool = True  # the instruction's text tokens enter the encoder
    aux_loss: bool = True  # losses on every decoder layer's predictions, not only the last
    span_l1_weight: float = 10.0  # loss weight of the span L1
    span_giou_weight: float = 1.0  # loss weight of the span gIoU
    label_weight: float = 4.0  # loss weight of the foreground / no-object CE
    saliency_weight: float = 4.0  # loss weight of the saliency terms
    eos_coef: float = 0.1  # class weight of "no object" in the CE
    saliency_margin: float = 0.2  # margin of the saliency ranking loss
    saliency_loss: str = "ranking"  # "ranking" (ours: all ordered pairs + contrastive) or "release" (CG-DETR's)
    match_cost_span: float = 10.0  # Hungarian matching cost of the span L1
    match_cost_giou: float = 1.0  # matching cost of the span gIoU
    match_cost_class: float = 4.0  # matching cost of the foreground probability
    frame_pooling: str = "mean_max"  # pooling of each frame's visual tokens: "mean" or "mean_max" (concatenated)
    decoder: str = "detr"  # "detr" (moment queries) or "dense" (ours: frame-anchored, fast to train from scratch)
    nms_iou: float = 0.7  # IoU above which predicted moments are suppressed at inference
    span_l1_reduction: str = "coordinate_sum"  # "coordinate_sum" (ours) or "mean" (the release)
    label_reduction: str = "weight_normalised"  # "weight_normalised" (ours) or "mean" (the release)
    num_dummies: int = 0  # CG-DETR's dummy tokens, keys of the text-to-video layers (needs t2v_layers)
    dummy_layers: int = 2  # encoder layers of the dummy tokens
    t2v_layers: int = 0  # CG-DETR's text-to-video layers before the encoder
    t2v_saliency_weight: float = 1.0  # weight of the saliency terms on the text-to-video relevance
    negative_pairs: bool = False  # in training, each video is also paired with another sample's query (needs t2v)
    reference_points: bool = False  # the DETR decoder refines anchors layer by layer (decoder "detr" only)
    input_dropout: float = 0.0  # dropout on the head's inputs, in [0, 1)
    # > 0: per-clip features from the MLLM's vision tower (frozen), one clip per that many seconds, instead of only
    # the LLM's frames (README "Dense temporal features"); 0: off
    dense_clip_seconds: float = 0.0
    dense_max_clips: int = 256  # most clips read with dense_clip_seconds (at least 2)


@dataclasses.dataclass(frozen=True)
class BoxPromptConfig(_HeadSettings):
    """Settings of the mask head's box-prompt localiser (a `RegionHead` in "heatmap" mode; `MaskHeadConfig.box_prompt`).
    The fields are the region head's, with the same meaning."""

    heatmap_dim: int = 256
    l1_weight: float = 2.0
    giou_weight: float = 0.2
    heatmap_weight: float = 1.0
    heatmap_score: str = "additive"
    query_text: bool = False


@dataclasses.dataclass(frozen=True)
class MaskHeadConfig(_HeadSettings):
    """Settings of the mask head (`MaskHead`): task embedding -> MLP hidden -> hidden -> K x prompt_dim sparse SAM2
    prompts. Ours trains BCE + Dice on the masks (weights as LISA) and SAM2's mask decoder; the release freezes all
    of SAM2 and trains only an L1 to SAM2's prompt embedding of the GT box plus an L1 on a box (0 here)."""

    num_prompt_tokens: int = 3  # K sparse prompt tokens per task token
    bce_weight: float = 2.0  # loss weight of the sigmoid BCE on the masks
    dice_weight: float = 0.5  # loss weight of the Dice loss on the masks
    prompt_l1_weight: float = 0.0  # the release's L1 from the prompt embedding to SAM2's embedding of the GT box
    box_l1_weight: float = 0.0  # the release's L1 on a box regressed from the task embedding (a regressor when > 0)
    freeze_image_encoder: bool = True  # SAM2's image encoder is frozen (and runs without building a graph)
    freeze_prompt_encoder: bool = True  # SAM2's prompt encoder is frozen
    freeze_mask_decoder: bool = False  # SAM2's mask decoder is frozen
    multimask_output: bool = False  # SAM2 predicts 3 masks and the one of highest predicted IoU is kept
    # SAM2's fallback (`dynamic_multimask_via_stability`), at inference only, from its single mask to the best of its
    # 3 multimask outputs when the single mask is unstable: None follows `freeze_mask_decoder` (on for a frozen
    # pretrained decoder, as released; off for a decoder trained here on the single mask only, whose multimask
    # outputs stay untrained and would be swapped in at evaluation)
    stability_fallback: bool | None = None
    box_prompt: bool = False  # not in the release: a localised box as an extra SAM2 prompt (see mask_head.py)
    box_prompt_config: dict | None = None  # the localiser's settings (`BoxPromptConfig`'s keys), None: its defaults
    box_loss_weight: float = 1.0  # weight of the localiser's loss (`mask_box`) inside the `mask` term
    # training only: the share of SAM2 images (showing the object) prompted with their GT mask's box instead of the
    # localiser's, so that SAM2's decoder learns to follow a box prompt (the localiser learns from its own loss)
    box_prompt_teacher_forcing: float = 0.0
    # not in the release: the mask stays inside its box prompt (the localiser's, a teacher-forced GT box or a user's),
    # grown by `box_bound_margin` of the box's width / height on each side; pixels outside it are background. SAM2's
    # own box prompt asks for the object in the box; a decoder trained from scratch learns foreground long before it
    # learns to read its prompts, and this makes its masks follow the box, i.e. the question
    box_bounds_mask: bool = False
    box_bound_margin: float = 0.1
    # False: SAM2's prompts read a detached task embedding, so the mask loss trains the prompt MLP and SAM2 but not
    # the MLLM, which then learns the mask task through the box prompt's localiser alone (True: the release's path)
    prompt_gradient: bool = True


DEFAULT_REGION_HEAD = RegionHeadConfig().to_dict()
DEFAULT_TEMPORAL_HEAD = TemporalHeadConfig().to_dict()
DEFAULT_MASK_HEAD = MaskHeadConfig().to_dict()
DEFAULT_BOX_PROMPT = BoxPromptConfig().to_dict()
HEAD_CONFIG_CLASSES = {"region_head_config": RegionHeadConfig, "temporal_head_config": TemporalHeadConfig,
                       "mask_head_config": MaskHeadConfig}
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
    _refuse_unknown_keys(name, given, defaults)
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
        region_head_config, temporal_head_config, mask_head_config (`dict`, `RegionHeadConfig`, ..., *optional*):
            Head settings and their internal loss weights: keys (and defaults) of `RegionHeadConfig`,
            `TemporalHeadConfig` and `MaskHeadConfig`; stored as plain dicts. The model builds each head from the
            typed settings (`head_settings`).
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
    region_head_config: dict | RegionHeadConfig | None = None
    temporal_head_config: dict | TemporalHeadConfig | None = None
    mask_head_config: dict | MaskHeadConfig | None = None
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
        # the head settings stay plain dicts here (config.json), a typed instance given is stored as its dict
        for name, settings_class in HEAD_CONFIG_CLASSES.items():
            given = getattr(self, name)
            if dataclasses.is_dataclass(given) and not isinstance(given, type):
                given = dataclasses.asdict(given)
            setattr(self, name, _merge_defaults(name, settings_class().to_dict(), given, preset.get(name)))
        self.loss_weights = _merge_defaults("loss_weights", DEFAULT_LOSS_WEIGHTS, self.loss_weights,
                                            preset.get("loss_weights"))

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

    def head_settings(self, task: str) -> "RegionHeadConfig | TemporalHeadConfig | MaskHeadConfig":
        """The typed settings of a task's head (`"region"`, `"temporal"` or `"mask"`), from `{task}_head_config`."""
        name = f"{task}_head_config"
        return HEAD_CONFIG_CLASSES[name].build(getattr(self, name), name=name)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The wrapped MLLM's text configuration (generation and embedding resizing read it)."""
        return self.mllm_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def all_task_token_ids(self) -> list[int]:
        """Ids of every begin and slot token, all tasks included."""
        if self.task_token_ids is None:
            return []
        return [v for entry in self.task_token_ids.values() for v in [entry["begin"], *entry["slots"]]]


__all__ = ["BoxPromptConfig", "MaskHeadConfig", "RegionHeadConfig", "TemporalHeadConfig", "TPOConfig"]

TPOConfig.register_for_auto_class()
