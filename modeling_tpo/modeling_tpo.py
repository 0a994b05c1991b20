"""TPO model: an existing transformers vision-language model with task tokens, a task router and
task heads (region, temporal, mask).

This file is copied next to saved checkpoints as remote code: it imports only torch,
transformers and its sibling files (relative imports), nothing optional at module level.
"""

import contextlib
import copy
import functools
import inspect
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep

from .features import dense_clip_frames, gather_token_features, normalised_frame_times, pool_frame_features
from .configuration_tpo import CUSTOM_PIPELINES, IGNORE_INDEX, ROUTER_CLASSES, TASK_NAMES, TPOConfig
from .box_ops import masks_to_boxes
from .generation_tpo import (
    TaskTokenLogitsProcessor,
    TPOGenerateOutput,
    append_to_left_padded,
    check_normalised_box,
    generated_attention_mask,
    incomplete_slot_runs,
    right_align,
)
from .region_head import RegionHead
from .task_tokens import TaskRouter, TaskTokens

logger = logging.getLogger(__name__)

# Inputs used only by the heads' pass of `generate` (not by the MLLM's decoding).
_HEAD_ONLY_INPUTS = (
    "instruction_end_index", "query_token_mask", "frame_token_index", "frame_timestamps", "video_durations",
    "visual_token_xy",
    "sam2_pixel_values", "mask_query_index", "sam2_batch_index", "mask_frame_index", "mask_view_to_sam2", "tpo_meta",
)
_TRAINING_TARGETS = (
    "labels", "task_labels", "region_boxes", "region_batch_index", "temporal_spans", "temporal_span_query_index",
    "temporal_saliency", "mask_targets",
)
# per SAM2 image (m, ...), never per token, whatever their shapes
_MASK_IMAGE_KEYS = ("mask_frame_index", "mask_view_to_sam2")
# every input with one row per SAM2 image (m, ...): slice them together when SAM2 images are dropped
SAM2_IMAGE_INPUTS = ("sam2_pixel_values", "mask_query_index", "sam2_batch_index", "mask_targets", *_MASK_IMAGE_KEYS)
_NOT_PER_TOKEN = ("sam2_pixel_values", "mask_query_index", "sam2_batch_index", "mask_targets", "region_boxes",
                  "region_batch_index", "temporal_spans", "temporal_span_query_index", *_MASK_IMAGE_KEYS)
_PER_TOKEN_FILL = {"frame_token_index": -1, "query_token_mask": False, "mm_token_type_ids": 0, "visual_token_xy": -1.0}
MASK_VIDEO_MODES = ("propagate", "per_frame")
DENSE_PREFIX = "dense_"  # inputs of the temporal head's dense clips: head-only, per clip (never per token)
_ONE_SEQUENCE_PER_PROMPT = (
    "Task heads run on one sequence per prompt; with num_return_sequences > 1 pass run_task_heads=False."
)


@dataclass
class TPOOutput(ModelOutput):
    r"""
    Output of [`TPOForConditionalGeneration.forward`].

    loss (`torch.FloatTensor` of shape `()`): weighted sum of every term below that could be computed.
    lm_loss, assign_loss, region_loss, temporal_loss, mask_loss (`torch.FloatTensor` of shape `()`):
        each term before its weight in `config.loss_weights`.
    loss_dict (`dict[str, torch.Tensor]`): every term, finer ones included (`region_l1`, ...), detached.
    logits (`torch.FloatTensor` of shape `(batch, seq_len or logits_to_keep, vocab)`): LM logits; with `labels` and
        `config.labelled_logits_only`, `(num_labelled_positions, vocab)`, the positions that predict a label.
    router_logits (`torch.FloatTensor` of shape `(batch, 4)`): task router logits over
        `ROUTER_CLASSES` = (text, temporal, region, mask).
    pred_boxes (`torch.FloatTensor` of shape `(num_region_queries, 4)`): normalised
        (x0, y0, x1, y1) boxes, one per region query, queries in (sample, position) order.
    pred_boxes_batch_index (`torch.LongTensor` of shape `(num_region_queries,)`): sample of each box.
    temporal_outputs (`dict`): the temporal head's outputs for the temporal queries (see
        `TemporalHead.forward`: `pred_spans` (q, num_moments, 2) normalised (center, width),
        `pred_logits`, `pred_saliency` (q, frames)) plus `batch_index` (q,) and `frame_mask`.
    mask_outputs (`dict`): the mask head's outputs (`pred_mask_logits` (m, h, w) per SAM2 image,
        `iou_scores`) plus `query_index` (m,), `batch_index` (q,) and `task_embeddings` (q, k, hidden)
        of the mask queries (the latter for `track_masks`).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    assign_loss: torch.FloatTensor | None = None
    region_loss: torch.FloatTensor | None = None
    temporal_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    logits: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_boxes_batch_index: torch.LongTensor | None = None
    temporal_outputs: dict | None = None
    mask_outputs: dict | None = None
    cache: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

    @property
    def past_key_values(self):
        """The KV cache under its name before transformers 5.24 (`cache` since)."""
        return self.cache


@dataclass
class _HeadContext:
    """What every head may read from one forward pass."""

    hidden_states: torch.Tensor
    queries: dict
    query_token_mask: torch.Tensor | None
    frame_token_index: torch.Tensor | None
    frame_timestamps: torch.Tensor | None
    video_durations: torch.Tensor | None
    computing_loss: bool = False
    visual_token_xy: torch.Tensor | None = None
    dense_inputs: dict | None = None  # `dense_*` inputs: the temporal head's dense clips


def _query_text_features(context: "_HeadContext", samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The instruction's text-token hidden states of each query's sample: (q, Q, hidden) features and (q, Q) mask.
    Without a query mask the query tokens are all masked out (the heads' weights stay in the graph)."""
    hidden = context.hidden_states[samples]
    token_mask = context.query_token_mask
    token_mask = (token_mask.to(hidden.device)[samples] if token_mask is not None
                  else torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device))
    return gather_token_features(hidden, token_mask)


@dataclass
class _MaskRequest:
    """How `generate` segments the mask queries: `mode` (one of MASK_VIDEO_MODES), per-sample initial
    boxes (normalised, or None) and the collator's `task_labels` (which samples carry SAM2 frames)."""

    mode: str = "propagate"
    initial_boxes: list | None = None
    task_labels: torch.Tensor | None = None


@dataclass
class _MaskPlan:
    """Per generated mask query (in query order): its sample, its SAM2 frames (T, 3, S, S), whether it is
    tracked, and its initial box (normalised, or None)."""

    samples: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    tracked: list = field(default_factory=list)
    initial_boxes: list = field(default_factory=list)


@dataclass
class TaskQueries:
    """Where one task's queries sit in a batch: `batch_index` (num_queries,) and `positions`
    (num_queries, num_task_tokens), the sequence positions of each query's slot tokens."""

    batch_index: torch.LongTensor
    positions: torch.LongTensor

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> task embeddings (num_queries, num_task_tokens, hidden)."""
        return hidden_states[self.batch_index[:, None], self.positions]


def _unused_heads_need_gradients() -> bool:
    """Only data-parallel training (DDP, FSDP, DeepSpeed: torch.distributed initialised) needs every
    trainable parameter to get a gradient at every step; a single process skips the zero-touch term, which
    costs one small op per parameter (~12 ms a step with SAM2 on a CPU)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _zero_touch(*modules: nn.Module | None) -> torch.Tensor | None:
    """0 * (one element of every trainable parameter): a loss term that is exactly zero but
    gives every parameter of `modules` a (zero) gradient, so that DDP needs no
    `find_unused_parameters` when a batch has no sample of some task."""
    terms = [p.reshape(-1)[:1].sum() for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    if not terms:
        return None
    return torch.stack([t.float() for t in terms]).sum() * 0.0


class TPOPreTrainedModel(PreTrainedModel):
    config_class = TPOConfig
    base_model_prefix = "mllm"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TaskTokens):
            for parameter in module.embeddings.values():
                init.normal_(parameter, mean=0.0, std=self.config.initializer_range)


class TPOForConditionalGeneration(TPOPreTrainedModel, GenerationMixin):
    """A transformers vision-language model (the "MLLM") extended with TPO's task preference model.

    The MLLM is built with the Auto classes from `config.mllm_config` and runs unchanged. Its
    last hidden states feed:
      - the task router, at the end of the instruction -> `router_logits`, `L_assign`;
      - the heads, at the task-slot positions (task embeddings), whose input embeddings are the
        learnable task tokens -> boxes (region), spans (temporal), masks (mask).
    """

    def __init__(self, config: TPOConfig, mllm: PreTrainedModel | None = None):
        super().__init__(config)
        if config.task_token_ids is None:
            raise ValueError(
                "TPOConfig.task_token_ids is not set: the model needs the ids of the task tokens. Build the "
                "model with `TPOForConditionalGeneration.from_mllm(...)`, which adds the tokens to the tokenizer "
                "and the embeddings, or set `task_token_ids` in the config."
            )
        self.mllm = mllm if mllm is not None else AutoModelForImageTextToText.from_config(config.mllm_config)
        hidden_size = config.get_text_config().hidden_size
        self.task_tokens = TaskTokens(config.tasks, config.num_task_tokens, hidden_size)
        self.router = TaskRouter(hidden_size, config.tasks, config.router_hidden_size)
        self.region_head = RegionHead(hidden_size, **config.region_head_config) if "region" in config.tasks else None
        self.temporal_head = None
        if "temporal" in config.tasks:
            from .temporal_head import TemporalHead

            self.temporal_head = TemporalHead(hidden_size, **config.temporal_head_config)
        self.mask_head = None
        if "mask" in config.tasks:
            from .mask_head import MaskHead

            self.mask_head = MaskHead(hidden_size, config.sam2_config, **config.mask_head_config)

        # Plain lists, not buffers: from_pretrained does not restore non-persistent buffers.
        self.slot_token_id_list = [i for task in config.tasks for i in config.task_token_ids[task]["slots"]]
        self._tasks = list(config.tasks)
        # refused in the input: the begin and slot tokens of tasks this model does not enable
        self._disabled_token_ids = [i for task in TASK_NAMES if task not in config.tasks
                                    for i in [config.task_token_ids[task]["begin"], *config.task_token_ids[task]["slots"]]]
        self._valid_task_labels = [IGNORE_INDEX] + [i for i, name in enumerate(ROUTER_CLASSES)
                                                    if name == "text" or name in config.tasks]
        self._id_tensors = {}
        self._task_token_hook = {"module": None, "handle": None}
        self._loss_weight_override: dict | None = None
        self.post_init()
        if mllm is not None:
            self.generation_config = copy.deepcopy(mllm.generation_config)
        if self.generation_config is not None:
            # generate() returns the sequences with the heads' predictions unless asked otherwise.
            self.generation_config.return_dict_in_generate = True
        self._attach_task_token_hook()

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weights of the loss terms in use: `config.loss_weights`, or a stage's (see `loss_weights_as`)."""
        return self._loss_weight_override or self.config.loss_weights

    @contextlib.contextmanager
    def loss_weights_as(self, weights: dict[str, float] | None):
        """Use other loss weights inside the block (a training stage's), leaving the config untouched."""
        previous = self._loss_weight_override
        self._loss_weight_override = {**self.config.loss_weights, **weights} if weights else None
        try:
            yield self
        finally:
            self._loss_weight_override = previous

    # ----------------------------------------------------------------------------------------
    # Embeddings and the task-token hook
    # ----------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.mllm.set_input_embeddings(value)
        self._attach_task_token_hook()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.mllm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.mllm.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.mllm.get_decoder()

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, keeping this model's own parameter names by default.

        transformers renames the keys of its VLM classes to an older layout on save and expects
        loaders to convert them back; `Trainer`'s checkpoint resume loads without converting, so
        renamed language-model weights would silently not be restored. TPO checkpoints have no older
        layout to stay compatible with, so they keep the names the modules have.
        """
        self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)  # for transformers' `pipeline(model=folder)`
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def enable_input_require_grads(self) -> None:
        """Make the outputs of the input embeddings require gradients (what gradient checkpointing and peft ask
        for), but only while the checkpointed layers fed by them have trainable parameters.

        transformers hooks the input embeddings of every sub-model, the vision tower's patch embedding included: a
        frozen vision tower then builds a graph, keeps its activations and, checkpointed, is recomputed and
        back-propagated at every step for nothing (a 5.6 s backward of a 1-layer Qwen2.5-VL tower over 4 frames
        on a CPU, out of a 60 s step). Here each hook first checks that some `GradientCheckpointingLayer` of its
        sub-model trains (LoRA in the LLM, `train_vision_tower`), so that reentrant checkpointing still gives those
        layers their gradients.
        """
        self.disable_input_require_grads()
        hooks, seen = [], set()
        for owner in self.modules():
            if not (isinstance(owner, PreTrainedModel) and hasattr(owner, "get_input_embeddings")):
                continue
            try:
                embedding = owner.get_input_embeddings()
            except NotImplementedError:
                continue
            if embedding is None or id(embedding) in seen or not hasattr(embedding, "register_forward_hook"):
                continue
            seen.add(id(embedding))
            layers = [m for m in owner.modules() if isinstance(m, GradientCheckpointingLayer)]
            hooks.append(embedding.register_forward_hook(functools.partial(_require_grad_if_trained, layers)))
        self._require_grads_hooks = hooks

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        embeddings = self.mllm.resize_token_embeddings(*args, **kwargs)
        self._attach_task_token_hook()
        return embeddings

    def _attach_task_token_hook(self) -> None:
        """Keep the task-token hook on the current input embedding module (resizing replaces it)."""
        embedding = self.mllm.get_input_embeddings()
        if self._task_token_hook["module"] is embedding:
            return
        if self._task_token_hook["handle"] is not None:
            self._task_token_hook["handle"].remove()
        self._task_token_hook["handle"] = embedding.register_forward_hook(self._inject_task_tokens)
        self._task_token_hook["module"] = embedding

    def _inject_task_tokens(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the input embeddings: slot-token embeddings -> learnable task tokens.

        Runs for every call of the embedding (training forward, generation steps), always with
        the same ops so that it adds no host-device synchronisation and the task tokens always
        get a gradient (zero where no slot token appears).
        """
        input_ids = args[0] if args else None
        if input_ids is None or not self.slot_token_id_list or input_ids.dtype not in (torch.long, torch.int):
            return output
        slot_ids = self._id_tensor("slots", self.slot_token_id_list, input_ids)
        match = input_ids.unsqueeze(-1) == slot_ids  # (..., num_slots)
        task_embeddings = self.task_tokens.stacked(self._tasks).to(device=output.device, dtype=output.dtype)
        # A product, not a select broadcasting the (num_slots, hidden) rows: the select's backward reduces a
        # (..., hidden) gradient over the batch dimensions, which measured ~1 ms per step on a 4.6 M LLaVA.
        replacement = match.to(output.dtype) @ task_embeddings  # (..., hidden)
        return torch.where(match.any(-1, keepdim=True), replacement, output)

    def _id_tensor(self, name: str, values: list[int], like: torch.Tensor) -> torch.Tensor:
        """`values` as a tensor on `like`'s device and dtype, made once per device (no host-to-device copy per
        step)."""
        key = (name, like.device, like.dtype)
        if key not in self._id_tensors:
            self._id_tensors[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
        return self._id_tensors[key]

    # ----------------------------------------------------------------------------------------
    # Building from an existing MLLM
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_mllm(
        cls,
        mllm_or_path: PreTrainedModel | str | PathLike,
        tasks: list[str] | tuple[str, ...] = TASK_NAMES,
        tokenizer=None,
        num_task_tokens: int = 1,
        mllm_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "TPOForConditionalGeneration":
        """Wrap a pretrained vision-language model, keeping its weights.

        Args:
            mllm_or_path: a model instance (e.g. `LlavaForConditionalGeneration`) or a folder /
                hub id that `AutoModelForImageTextToText.from_pretrained` loads.
            tasks: enabled tasks, a subset of `("temporal", "region", "mask")`.
            tokenizer: the MLLM's tokenizer (or processor). The task tokens of *every* task are
                added to it in place, so that the vocabulary does not depend on `tasks`. Without
                a tokenizer the tokens take ids after the current vocabulary.
            num_task_tokens: learnable slot tokens per task.
            mllm_kwargs: keyword arguments of `from_pretrained` when a path is given.
            **config_kwargs: further `TPOConfig` fields (head configs, loss weights, sam2_config, ...).

        The task tokens' embedding rows are set to the mean of the vocabulary's rows (see `_add_task_tokens`).
        """
        if isinstance(mllm_or_path, (str, PathLike)):
            mllm = AutoModelForImageTextToText.from_pretrained(mllm_or_path, **(mllm_kwargs or {}))
        else:
            mllm = mllm_or_path
        probe = TPOConfig(mllm_config=mllm.config, tasks=list(tasks), num_task_tokens=num_task_tokens, **config_kwargs)
        token_ids = _add_task_tokens(mllm, probe.task_token_strings, tokenizer)
        config = TPOConfig(
            mllm_config=mllm.config,
            tasks=list(tasks),
            num_task_tokens=num_task_tokens,
            task_token_ids=token_ids,
            **config_kwargs,
        )
        model = cls(config, mllm=mllm)
        # Heads are created in float32; follow the MLLM's dtype and device.
        reference = mllm.get_input_embeddings().weight
        model.to(device=reference.device, dtype=reference.dtype)
        return model

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        task_labels: torch.LongTensor | None = None,
        instruction_end_index: torch.LongTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_batch_index: torch.LongTensor | None = None,
        query_token_mask: torch.Tensor | None = None,
        frame_token_index: torch.LongTensor | None = None,
        visual_token_xy: torch.FloatTensor | None = None,
        frame_timestamps: torch.FloatTensor | None = None,
        video_durations: torch.FloatTensor | None = None,
        temporal_spans: torch.FloatTensor | None = None,
        temporal_span_query_index: torch.LongTensor | None = None,
        temporal_saliency: torch.FloatTensor | None = None,
        sam2_pixel_values: torch.FloatTensor | None = None,
        mask_query_index: torch.LongTensor | None = None,
        mask_targets: torch.FloatTensor | None = None,
        mask_frame_index: torch.LongTensor | None = None,
        mask_view_to_sam2: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        tpo_meta: dict | None = None,
        backbone_hidden_states: torch.FloatTensor | None = None,
        **kwargs,
    ) -> TPOOutput:
        r"""
        Args:
            input_ids, attention_mask, position_ids, cache (or past_key_values before transformers 5.24),
                inputs_embeds, and any other
                keyword argument (`pixel_values`, `image_sizes`, `pixel_values_videos`,
                `image_grid_thw`, `video_grid_thw`, `mm_token_type_ids`, ...): passed to the MLLM.
            labels (`(batch, seq)`): next-token targets, -100 on prompt and padding.
            task_labels (`(batch,)`): router targets, indices into `ROUTER_CLASSES`
                (0 text, 1 temporal, 2 region, 3 mask) or -100 to ignore a sample.
            instruction_end_index (`(batch,)`): position of the last instruction token, whose hidden
                state the router reads. Default: the token before the first label, else the last
                attended token.
            region_boxes (`(num_region_queries, 4)`): target boxes, normalised (x0, y0, x1, y1), one
                per region slot, in (sample, position) order.
            region_batch_index (`(num_region_queries,)`): the sample of each target box.
            query_token_mask (`(batch, seq)` bool): the instruction's text tokens (temporal head query).
            frame_token_index (`(batch, seq)`): head-frame index of each visual token, -1 elsewhere.
            visual_token_xy (`(batch, seq, 2)`): each visual token's patch centre in its image,
                normalised, -1 elsewhere (the "heatmap" region head reads it).
            frame_timestamps (`(batch, frames)`): head-frame times in seconds (-1 where padded).
            video_durations (`(batch,)`): video durations in seconds.
            temporal_spans (`(num_spans, 2)`): GT windows, normalised (start, end);
            temporal_span_query_index (`(num_spans,)`): the temporal query of each window.
            temporal_saliency (`(num_temporal_queries, frames)`): per-frame saliency targets >= 0.
            sam2_pixel_values (`(m, 3, S, S)`): SAM2 inputs of the mask queries' images/frames;
            mask_query_index (`(m,)`): the mask query of each SAM2 image; mask_targets (`(m, S, S)`).
            mask_frame_index (`(m,)`): for the mask head's box prompt, the head frame (`frame_token_index`
                value) whose visual tokens show each SAM2 image, -1 for all the sample's visual tokens
                (images; the default).
            mask_view_to_sam2 (`(m, 4)`): (a_x, b_x, a_y, b_y) mapping the visual tokens' normalised
                coordinates to SAM2's (x_sam2 = a_x * x + b_x): padding and cropping of the MLLM's image
                processor (default: the identity, a plain resize).
            dense_clip_timestamps (`(batch, clips)`), dense_pixel_values, dense_image_grid_thw: the dense temporal
                clips (temporal head with `dense_clip_seconds` > 0): their times in seconds (-1 where padded) and the
                vision tower's inputs of each clip frame, sample by sample (the collator gives them).
            tpo_meta: per-sample metadata from the collator, ignored here.
            backbone_hidden_states (`(batch, seq, hidden)`): the MLLM's last hidden states for these inputs,
                computed elsewhere (`generate` reuses those of decoding): the backbone is not run, the
                heads, router and LM head read these.
            num_items_in_batch: passed by the Trainer; the LM loss normalises by it.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        dense_inputs = {key: kwargs.pop(key) for key in list(kwargs) if key.startswith(DENSE_PREFIX)}
        self._attach_task_token_hook()
        if input_ids is not None:
            self._check_task_tokens(input_ids)
        if task_labels is not None:
            self._check_task_labels(task_labels)
        if input_ids is not None and backbone_hidden_states is None:
            self._check_visual_inputs(input_ids, kwargs, cache if cache is not None else past_key_values)

        if backbone_hidden_states is not None:
            backbone_outputs = BaseModelOutputWithPast(last_hidden_state=backbone_hidden_states)
        else:
            backbone_outputs = self._run_backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache if cache is not None else past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = backbone_outputs.last_hidden_state  # (batch, seq, hidden)
        lm_targets = {}
        every_position = isinstance(logits_to_keep, int) and not logits_to_keep
        if labels is not None and self.config.labelled_logits_only and every_position:
            labelled_hidden, lm_targets["shift_labels"] = _labelled_positions(hidden_states, labels)
            logits = self.mllm.get_output_embeddings()(labelled_hidden)  # (num_labelled, vocab)
        else:
            logits = self.mllm.get_output_embeddings()(slice_logits_to_keep(hidden_states, logits_to_keep))

        weights = self.loss_weights
        computing_loss = labels is not None or task_labels is not None
        terms: dict[str, torch.Tensor] = {}
        finer: dict[str, torch.Tensor] = {}
        if labels is not None and weights["lm"] != 0:
            terms["lm"] = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.get_text_config().vocab_size,
                num_items_in_batch=num_items_in_batch,
                **lm_targets,
            )

        end_index = self._instruction_end_index(hidden_states, labels, attention_mask, instruction_end_index)
        batch_range = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        router_logits = self.router(hidden_states[batch_range, end_index])
        if task_labels is not None and weights["assign"] != 0:
            terms["assign"] = self._assign_loss(router_logits, task_labels)

        queries = self._locate_task_queries(input_ids) if input_ids is not None else {}
        context = _HeadContext(
            hidden_states=hidden_states, queries=queries, query_token_mask=query_token_mask,
            frame_token_index=frame_token_index, frame_timestamps=frame_timestamps, video_durations=video_durations,
            computing_loss=computing_loss, visual_token_xy=visual_token_xy, dense_inputs=dense_inputs or None,
        )
        targets = {
            "region": (region_boxes, region_batch_index),
            "temporal": (temporal_spans, temporal_span_query_index, temporal_saliency),
            "mask": (sam2_pixel_values, mask_query_index, mask_targets, mask_frame_index, mask_view_to_sam2),
        }
        predictions: dict[str, dict] = {}
        untouched = []
        for task in self._tasks:
            if computing_loss and weights[task] == 0:  # not trained in this stage: skip the head
                untouched.append(task)
                continue
            task_predictions, task_terms = getattr(self, f"_{task}_outputs")(context, *targets[task])
            predictions[task] = task_predictions
            if task_terms:
                terms[task] = task_terms.pop(task)
                finer.update(task_terms)
            else:
                untouched.append(task)

        loss = None
        if computing_loss or terms:
            loss = sum(weights[name] * value.float() for name, value in terms.items())
            # Under data parallelism, heads without samples in this batch still get (zero) gradients: DDP
            # needs no `find_unused_parameters` for mixed-task batches.
            touch = None
            if _unused_heads_need_gradients():
                touch = _zero_touch(*(getattr(self, f"{task}_head") for task in untouched))
            loss = loss + touch if touch is not None else loss
            if not torch.is_tensor(loss):
                loss = torch.zeros((), device=hidden_states.device)
        loss_dict = {name: value.detach() for name, value in {**terms, **finer}.items()}
        region = predictions.get("region", {})

        return TPOOutput(
            loss=loss,
            lm_loss=terms.get("lm"),
            assign_loss=terms.get("assign"),
            region_loss=terms.get("region"),
            temporal_loss=terms.get("temporal"),
            mask_loss=terms.get("mask"),
            loss_dict=loss_dict,
            logits=logits,
            router_logits=router_logits,
            pred_boxes=region.get("pred_boxes"),
            pred_boxes_batch_index=region.get("batch_index"),
            temporal_outputs=predictions.get("temporal"),
            mask_outputs=predictions.get("mask"),
            cache=cache_of(backbone_outputs),
            hidden_states=getattr(backbone_outputs, "hidden_states", None),
            attentions=getattr(backbone_outputs, "attentions", None),
        )

    # ----------------------------------------------------------------------------------------------
    # Heads
    # ----------------------------------------------------------------------------------------------
    def _region_outputs(self, context: "_HeadContext", region_boxes, region_batch_index):
        """Region predictions (normalised xyxy boxes, one per query) and, with targets, loss terms."""
        queries = context.queries.get("region")
        has_queries = queries is not None and queries.batch_index.numel() > 0
        predictions, terms = {}, {}
        if has_queries:
            visual = {}
            if self.region_head.needs_visual_tokens:
                if context.visual_token_xy is None:
                    raise ValueError("The 'heatmap' region head needs `visual_token_xy` (each visual token's patch "
                                     "centre); TPOProcessor and its collator provide it.")
                xy = context.visual_token_xy.to(context.hidden_states.device)[queries.batch_index]
                features, mask, order = gather_token_features(context.hidden_states[queries.batch_index], xy[..., 0] >= 0,
                                                              return_order=True)
                visual = {"visual_features": features, "visual_mask": mask,
                          "visual_xy": torch.gather(xy, 1, order[..., None].expand(-1, -1, 2))}
                if self.region_head.query_text:
                    visual["query_features"], visual["query_mask"] = _query_text_features(context, queries.batch_index)
            boxes_cxcywh, token_scores = self.region_head.forward_with_heatmap(queries.gather(context.hidden_states),
                                                                               **visual)
            predictions = {"pred_boxes": _cxcywh_to_clamped_xyxy(boxes_cxcywh), "batch_index": queries.batch_index}
        if region_boxes is not None:
            matched = self._match_targets("region", queries, region_boxes, region_batch_index)
            if has_queries:
                terms = self.region_head.loss(boxes_cxcywh, matched, token_scores, visual.get("visual_xy"))
        return predictions, terms

    def _temporal_outputs(self, context: "_HeadContext", spans, span_query_index, saliency):
        """Temporal predictions for the temporal queries and, with targets, loss terms.

        Frame features are the means of each frame's visual-token hidden states; the query features are
        the hidden states of the instruction's text tokens of the query's sample.
        """
        queries = context.queries.get("temporal")
        has_queries = queries is not None and queries.batch_index.numel() > 0
        num_spans = None
        if context.computing_loss and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process computes this at every training step (with or without temporal samples),
            # so the collective always matches across processes.
            local = float(spans.shape[0]) if (spans is not None and has_queries) else 0.0
            num_spans = torch.tensor(local, device=context.hidden_states.device)
            torch.distributed.all_reduce(num_spans)
            num_spans = num_spans / torch.distributed.get_world_size()
        if not has_queries:
            if spans is not None and spans.numel() > 0:
                raise ValueError(f"The batch has {spans.shape[0]} temporal target span(s) but no temporal slot "
                                 f"({self.config.task_token_strings['temporal']['slots'][0]}).")
            return {}, {}
        if context.frame_token_index is None:
            raise ValueError(
                "Temporal queries need `frame_token_index` (which visual tokens belong to which frame); TPOProcessor "
                "and its collator provide it."
            )
        sample = queries.batch_index
        hidden = context.hidden_states[sample]  # (q, seq, hidden)
        frame_index = context.frame_token_index.to(hidden.device)[sample]
        num_frames = int(frame_index.max().item()) + 1
        if context.frame_timestamps is not None:
            num_frames = max(num_frames, context.frame_timestamps.shape[1])
        frame_features, frame_mask = pool_frame_features(hidden, frame_index, num_frames,
                                                         pooling=self.temporal_head.frame_pooling)
        valid_frames = frame_mask.sum(-1)
        if bool((valid_frames < 2).any()):
            bad = sample[valid_frames < 2].tolist()
            raise ValueError(f"Sample(s) {bad}: a temporal query needs a video of at least 2 frames; found "
                             f"{valid_frames[valid_frames < 2].tolist()} frame(s).")
        timestamps = context.frame_timestamps[sample] if context.frame_timestamps is not None else None
        durations = context.video_durations[sample] if context.video_durations is not None else None
        frame_times = normalised_frame_times(frame_mask, timestamps, durations)
        clip_features = None
        if self.temporal_head.uses_dense_clips:  # the head's frames: dense clips, each with its nearest LLM frame
            frame_features, clip_features, frame_mask, frame_times = dense_clip_frames(
                self.mllm, context.dense_inputs, sample, context.video_durations, frame_features, frame_mask,
                frame_times, self.temporal_head.frame_pooling)
            num_frames = frame_mask.shape[1]
        query_features, query_mask = _query_text_features(context, sample)
        outputs = self.temporal_head(queries.gather(context.hidden_states), frame_features, frame_mask, frame_times,
                                     query_features, query_mask, clip_features=clip_features, query_groups=sample)
        predictions = {**outputs, "batch_index": sample, "frame_mask": frame_mask, "frame_times": frame_times}
        if spans is None:
            return predictions, {}
        targets = self._temporal_targets(queries, spans, span_query_index, saliency, num_frames)
        return predictions, self.temporal_head.loss(outputs, targets, num_spans)

    def _temporal_targets(self, queries: TaskQueries, spans, span_query_index, saliency, num_frames: int) -> list[dict]:
        num_queries = queries.batch_index.numel()
        spans = spans.to(queries.batch_index.device).float()
        if span_query_index is None:
            if num_queries != 1:
                raise ValueError("Several temporal queries need `temporal_span_query_index` to assign the spans.")
            span_query_index = torch.zeros(spans.shape[0], dtype=torch.long, device=spans.device)
        span_query_index = span_query_index.to(spans.device).long()
        counts = torch.bincount(span_query_index, minlength=num_queries)
        if counts.numel() > num_queries or bool((counts[:num_queries] == 0).any()):
            samples = queries.batch_index.tolist()
            raise ValueError(
                f"The batch has {num_queries} temporal slot(s) (samples {samples}) but spans for queries "
                f"{sorted(set(span_query_index.tolist()))}; every temporal slot needs at least one target span."
            )
        bad = (spans[:, 0] >= spans[:, 1]) | (spans < -1e-4).any(-1) | (spans > 1 + 1e-4).any(-1) | spans.isnan().any(-1)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            sample = int(queries.batch_index[span_query_index[j]])
            raise ValueError(f"Temporal span {spans[j].tolist()} of sample {sample} is invalid: spans are normalised "
                             "(start, end) by the video duration, with 0 <= start < end <= 1.")
        targets = []
        for q in range(num_queries):
            row = None
            if saliency is not None:
                row = saliency[q, :num_frames].to(spans.device).float()
                if row.numel() < num_frames:
                    row = F.pad(row, (0, num_frames - row.numel()))
            targets.append({"spans": spans[span_query_index == q], "saliency": row})
        return targets

    def _mask_outputs(self, context: "_HeadContext", sam2_pixel_values, mask_query_index, mask_targets,
                      mask_frame_index=None, mask_view_to_sam2=None):
        """Mask logits for every SAM2 image of the mask queries and, with targets, loss terms."""
        queries = context.queries.get("mask")
        has_queries = queries is not None and queries.batch_index.numel() > 0
        if not has_queries:
            if mask_targets is not None and mask_targets.numel() > 0:
                raise ValueError(f"The batch has {mask_targets.shape[0]} mask target(s) but no mask slot "
                                 f"({self.config.task_token_strings['mask']['slots'][0]}).")
            return {}, {}
        num_queries = queries.batch_index.numel()
        if sam2_pixel_values is None:
            raise ValueError(
                f"Sample(s) {queries.batch_index.tolist()} ask for masks but `sam2_pixel_values` is missing: mask "
                "samples need their images/frames at SAM2's input size (TPOProcessor.sam2_inputs)."
            )
        if mask_query_index is None:
            if sam2_pixel_values.shape[0] != num_queries:
                raise ValueError(f"{sam2_pixel_values.shape[0]} SAM2 images for {num_queries} mask queries: pass "
                                 "`mask_query_index` to say which query each image belongs to.")
            mask_query_index = torch.arange(num_queries, device=sam2_pixel_values.device)
        mask_query_index = mask_query_index.to(sam2_pixel_values.device).long()
        present = torch.bincount(mask_query_index, minlength=num_queries)
        if present.numel() > num_queries or bool((present == 0).any()):
            raise ValueError(f"`mask_query_index` {mask_query_index.tolist()} does not give every one of the "
                             f"{num_queries} mask queries (samples {queries.batch_index.tolist()}) at least one image.")
        self._check_mask_inputs(sam2_pixel_values, mask_targets, mask_query_index, queries.batch_index)
        task_embeddings = queries.gather(context.hidden_states)  # (q, k, hidden)
        localisation, input_boxes = None, None
        if self.mask_head.localiser is not None:
            localisation, input_boxes = self._mask_box_prompts(context, task_embeddings, queries.batch_index,
                                                               mask_query_index, mask_frame_index, mask_view_to_sam2)
        outputs = self.mask_head(task_embeddings, sam2_pixel_values=sam2_pixel_values,
                                 query_index=mask_query_index, input_boxes=input_boxes)
        predictions = {**outputs, "query_index": mask_query_index, "batch_index": queries.batch_index,
                       "task_embeddings": task_embeddings}
        if input_boxes is not None:
            predictions["prompt_boxes_xyxy_sam2"] = input_boxes
        if mask_targets is None:
            return predictions, {}
        if mask_targets.shape[0] != sam2_pixel_values.shape[0]:
            raise ValueError(f"{mask_targets.shape[0]} mask targets for {sam2_pixel_values.shape[0]} SAM2 images; "
                             "each SAM2 image needs its mask.")
        if localisation is not None:
            localisation.update(self._mask_box_targets(mask_targets, localisation["view_to_sam2"]))
        return predictions, self.mask_head.loss(outputs, mask_targets, localisation=localisation)

    def _mask_box_prompts(self, context: "_HeadContext", task_embeddings, batch_index, mask_query_index,
                          mask_frame_index, mask_view_to_sam2):
        """The mask head's box prompt per SAM2 image: its localiser over the visual tokens of the image's
        frame (all of the sample's visual tokens for images) -> a box in SAM2 input pixels (m, 4), detached,
        and the localisation outputs for the loss."""
        if context.visual_token_xy is None:
            raise ValueError("The mask head's box prompt needs `visual_token_xy` (each visual token's patch "
                             "centre); TPOProcessor and its collator provide it.")
        device = context.hidden_states.device
        m = mask_query_index.shape[0]
        for name, rows in (("mask_frame_index", mask_frame_index), ("mask_view_to_sam2", mask_view_to_sam2)):
            if rows is not None and rows.shape[0] != m:
                raise ValueError(f"`{name}` has {rows.shape[0]} rows for {m} SAM2 images; it needs one per image: "
                                 f"keep the rows of the SAM2 images passed (SAM2_IMAGE_INPUTS are sliced together).")
        samples = batch_index.to(device)[mask_query_index.to(device)]  # (m,)
        xy = context.visual_token_xy.to(device)[samples]  # (m, seq, 2)
        visual = xy[..., 0] >= 0
        if mask_frame_index is not None and context.frame_token_index is not None:
            frame = mask_frame_index.to(device).long()[:, None]
            own_frame = visual & (context.frame_token_index.to(device)[samples] == frame)
            # an image (-1), or a frame index the sample's tokens lack: all of its visual tokens
            visual = torch.where((frame >= 0) & own_frame.any(-1, keepdim=True), own_frame, visual)
        if not bool(visual.any(-1).all()):
            missing = sorted(set(samples[~visual.any(-1)].tolist()))
            raise ValueError(f"Sample(s) {missing}: a mask query's sample has no visual tokens for the box prompt.")
        features, mask, order = gather_token_features(context.hidden_states[samples], visual, return_order=True)
        xy = torch.gather(xy, 1, order[..., None].expand(-1, -1, 2))
        text = _query_text_features(context, samples) if self.mask_head.localiser.query_text else (None, None)
        localisation = self.mask_head.localise(task_embeddings[mask_query_index.to(device)], features, xy, mask, *text)
        if mask_view_to_sam2 is None:
            mask_view_to_sam2 = torch.tensor([[1.0, 0.0, 1.0, 0.0]], device=device).expand(m, 4)
        transform = mask_view_to_sam2.to(device).float()
        localisation["view_to_sam2"] = transform
        boxes = _cxcywh_to_clamped_xyxy(localisation["pred_boxes_cxcywh"].detach().float())
        scale, offset = _xyxy_scale_offset(transform)
        sam2_boxes = (boxes * scale + offset).clamp(0.0, 1.0) * self.mask_head.image_size
        return localisation, sam2_boxes

    @staticmethod
    def _mask_box_targets(mask_targets: torch.Tensor, view_to_sam2: torch.Tensor) -> dict:
        """GT boxes of the masks (m, S, S), in the visual tokens' normalised frame, and which frames show the
        object."""
        binary = mask_targets > 0.5
        height, width = binary.shape[-2:]
        boxes = masks_to_boxes(binary).to(view_to_sam2.device).float()
        boxes = boxes / torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype)
        scale, offset = _xyxy_scale_offset(view_to_sam2)
        view_boxes = ((boxes - offset) / scale).clamp(0.0, 1.0)
        has_object = binary.flatten(1).any(-1).to(view_boxes.device)
        # a degenerate box (object entirely in the padding) cannot be localised either
        has_object &= (view_boxes[:, 2] > view_boxes[:, 0]) & (view_boxes[:, 3] > view_boxes[:, 1])
        return {"target_boxes_xyxy": view_boxes, "has_object": has_object}

    def _run_backbone(self, input_ids: torch.LongTensor | None, cache=None, **inputs):
        """The MLLM without its LM head (its `base_model`), giving the last hidden states.

        The KV cache goes under the name the installed transformers uses (`cache` since 5.24,
        `past_key_values` before), so that no version warns or refuses it.

        A mismatch between image/video placeholder tokens and visual features is re-raised with
        the per-sample placeholder counts, so that the faulty sample can be found.
        """
        if cache is not None:
            inputs[_cache_argument(self.mllm.base_model)] = cache
        try:
            return self.mllm.base_model(input_ids=input_ids, **inputs)
        except ValueError as error:
            if input_ids is None or "do not match" not in str(error):
                raise
            raise ValueError(f"{error}. {self._describe_placeholders(input_ids)}") from error

    def _placeholder_token_id(self, kind: str) -> int | None:
        """The MLLM's image or video placeholder token id (`<kind>_token_id` or `<kind>_token_index`)."""
        mllm_config = self.config.mllm_config
        token_id = getattr(mllm_config, f"{kind}_token_id", None)
        return token_id if token_id is not None else getattr(mllm_config, f"{kind}_token_index", None)

    def _check_visual_inputs(self, input_ids: torch.LongTensor, inputs: dict, cache) -> None:
        """Refuse image/video placeholder tokens without their pixels: the MLLM would embed them as plain
        tokens and train on a finite, meaningless loss. (A cache that already holds the prompt is fine.)"""
        if cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0:
            return
        for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            token_id = self._placeholder_token_id(kind)
            if token_id is None or inputs.get(pixels) is not None:
                continue
            hits = (input_ids == token_id).any(-1)
            if bool(hits.any()):
                raise ValueError(f"Sample(s) {hits.nonzero().flatten().tolist()} hold {kind} placeholder tokens (id "
                                 f"{token_id}) but `{pixels}` is None: pass the {kind}s' pixels (TPOProcessor and its "
                                 f"collator do), or drop the placeholders from text-only samples.")

    def _describe_placeholders(self, input_ids: torch.LongTensor) -> str:
        parts = []
        for kind in ("image", "video"):
            token_id = self._placeholder_token_id(kind)
            if token_id is None:
                continue
            counts = (input_ids == token_id).sum(-1).tolist()
            nonzero = [c for c in counts if c > 0]
            if not nonzero:
                continue
            usual = Counter(nonzero).most_common(1)[0][0]
            odd = [i for i, c in enumerate(counts) if c > 0 and c % usual != 0]
            parts.append(
                f"{kind} placeholder tokens per sample: {counts}"
                + (f"; sample(s) {odd} differ from the usual {usual} per {kind}" if odd else "")
            )
        hint = (
            "Each sample needs exactly as many placeholder tokens as its visual inputs produce features "
            "(let the processor expand the placeholders)."
        )
        return "; ".join(parts + [hint])

    def _instruction_end_index(self, hidden_states, labels, attention_mask, instruction_end_index) -> torch.Tensor:
        """(batch,) position whose hidden state the router reads."""
        batch, seq_len = hidden_states.shape[:2]
        device = hidden_states.device
        if instruction_end_index is not None:
            return instruction_end_index.to(device).long().clamp(0, seq_len - 1)
        if attention_mask is not None and attention_mask.dim() == 2:
            flipped = attention_mask.to(device).flip(-1).long()
            last_attended = seq_len - 1 - flipped.argmax(-1)
        else:
            last_attended = torch.full((batch,), seq_len - 1, device=device)
        if labels is None or labels.shape[-1] != seq_len:
            return last_attended
        is_answer = labels.to(device) != IGNORE_INDEX
        first_answer = is_answer.long().argmax(-1)
        return torch.where(is_answer.any(-1), (first_answer - 1).clamp(min=0), last_attended)

    @staticmethod
    def _assign_loss(router_logits: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the samples whose label is not IGNORE_INDEX (0, with a zero gradient, when
        every sample is ignored), without a host-device synchronisation."""
        task_labels = task_labels.to(router_logits.device).long()
        total = F.cross_entropy(router_logits.float(), task_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (task_labels != IGNORE_INDEX).sum().clamp(min=1)

    # ----------------------------------------------------------------------------------------
    # Task queries and targets
    # ----------------------------------------------------------------------------------------
    def _locate_task_queries(self, input_ids: torch.LongTensor) -> dict[str, TaskQueries]:
        """Find the slot tokens of each enabled task: {task: TaskQueries}.

        A query is a run of the task's `num_task_tokens` slot tokens, in order.
        """
        queries = {}
        token_ids = self.config.task_token_ids
        for task in self._tasks:
            slot_ids = token_ids[task]["slots"]
            batch_index, first = (input_ids == slot_ids[0]).nonzero(as_tuple=True)
            positions = first[:, None]  # (num_queries, num_task_tokens)
            if len(slot_ids) > 1:
                positions = positions + torch.arange(len(slot_ids), device=input_ids.device)
                seq_len = input_ids.shape[1]
                inside = (positions < seq_len).all(-1)
                expected = torch.tensor(slot_ids, device=input_ids.device)
                found = input_ids[batch_index[:, None], positions.clamp(max=seq_len - 1)]
                complete = inside & (found == expected).all(-1)
                counts = [(input_ids == i).sum().item() for i in slot_ids]
                if not bool(complete.all()) or len(set(counts)) > 1:
                    bad = sorted(set(batch_index[~complete].tolist())) or "(unequal slot counts)"
                    strings = self.config.task_token_strings[task]["slots"]
                    raise ValueError(
                        f"Sample(s) {bad}: the {task} slot tokens must appear as complete runs "
                        f"{''.join(strings)}; found counts {dict(zip(strings, counts))}."
                    )
            queries[task] = TaskQueries(batch_index=batch_index, positions=positions)
        return queries

    def _match_targets(
        self,
        task: str,
        queries: TaskQueries | None,
        targets: torch.Tensor,
        target_batch_index: torch.LongTensor | None,
    ) -> torch.Tensor:
        """Check that every sample has as many targets as slots and return the targets, in query order."""
        num_queries = 0 if queries is None else queries.batch_index.numel()
        if (target_batch_index is not None and num_queries and target_batch_index.shape[0] == num_queries
                and targets.shape[0] == num_queries):
            # The collator's case: targets already in (sample, position) order. One test (and one host sync)
            # checks the order and, for boxes, their values; anything else takes the path below, which
            # reorders or names the faulty sample.
            in_order = (target_batch_index.to(queries.batch_index.device) == queries.batch_index).all()
            if task == "region":
                in_order = in_order & ~_invalid_box_rows(targets).any().to(in_order.device)
            if bool(in_order):
                return targets
        slot = self.config.task_token_strings[task]["slots"][0]
        if target_batch_index is not None:
            batch_size = int(max(queries.batch_index.max().item() + 1 if num_queries else 0,
                                 target_batch_index.max().item() + 1 if target_batch_index.numel() else 0))
            query_counts = torch.bincount(queries.batch_index, minlength=batch_size) if num_queries else None
            target_counts = torch.bincount(target_batch_index.to(targets.device).long(), minlength=batch_size)
            if query_counts is None:
                query_counts = torch.zeros_like(target_counts)
            query_counts = query_counts.to(target_counts.device)
            mismatched = (query_counts != target_counts).nonzero().flatten().tolist()
            if mismatched:
                i = mismatched[0]
                raise ValueError(
                    f"Sample {i} has {int(query_counts[i])} {task} slot(s) ({slot}) but {int(target_counts[i])} "
                    f"{task} target(s); each {slot} slot needs exactly one target (mismatched samples: {mismatched})."
                )
            if num_queries:
                order = torch.argsort(target_batch_index.to(targets.device), stable=True)
                targets = targets[order]
        elif num_queries != targets.shape[0]:
            raise ValueError(
                f"The batch has {num_queries} {task} slot(s) ({slot}) but {targets.shape[0]} {task} target(s); "
                f"pass `{task}_batch_index` to find the sample at fault."
            )
        if task == "region":
            self._check_boxes(targets, queries)
        return targets

    def _check_boxes(self, boxes: torch.Tensor, queries: TaskQueries | None) -> None:
        bad = _invalid_box_rows(boxes)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            sample = int(queries.batch_index[j]) if queries is not None and queries.batch_index.numel() > j else "?"
            raise ValueError(
                f"Region target {j} (sample {sample}) is {boxes[j].tolist()}: boxes must be normalised "
                "(x0, y0, x1, y1) within [0, 1] with x0 <= x1 and y0 <= y1. Normalise pixel boxes by the "
                "processed image size (TPOProcessor does) and check for swapped corners."
            )

    @staticmethod
    def _check_mask_inputs(sam2_pixel_values: torch.Tensor, mask_targets: torch.Tensor | None,
                           mask_query_index: torch.Tensor, batch_index: torch.Tensor) -> None:
        """Refuse non-finite SAM2 pixels and mask targets other than 0/1 (NaN included), naming the SAM2
        image and its sample; one test (one host sync) when everything is valid."""
        bad_pixels = ~torch.isfinite(sam2_pixel_values.flatten(1)).all(-1)  # (m,)
        bad_targets = torch.zeros_like(bad_pixels)
        if mask_targets is not None and mask_targets.shape[0] == bad_pixels.shape[0]:
            targets = mask_targets.flatten(1)
            bad_targets = ~((targets == 0) | (targets == 1)).all(-1).to(bad_pixels.device)
        if not bool((bad_pixels | bad_targets).any()):
            return
        image = int((bad_pixels | bad_targets).nonzero()[0])
        sample = int(batch_index[mask_query_index[image]])
        if bool(bad_pixels[image]):
            raise ValueError(f"SAM2 image {image} (sample {sample}) holds non-finite pixel values; check that image's "
                             "decoding and normalisation (TPOProcessor.sam2_inputs).")
        values = mask_targets[image].flatten()
        odd = values[~((values == 0) | (values == 1))][0].item()
        raise ValueError(f"The mask target of SAM2 image {image} (sample {sample}) holds the value {odd}; mask targets "
                         "are binary (0 or 1): resize masks with nearest-neighbour interpolation (TPOProcessor does).")

    def _check_task_tokens(self, input_ids: torch.LongTensor) -> None:
        """Refuse task tokens of tasks this model does not enable, naming the sample."""
        if not self._disabled_token_ids or not bool(
            torch.isin(input_ids, self._id_tensor("disabled", self._disabled_token_ids, input_ids)).any()
        ):
            return
        for task in TASK_NAMES:
            if task in self.config.tasks:
                continue
            ids = self.config.task_token_ids[task]
            strings = self.config.task_token_strings[task]
            for token_id, text in zip([ids["begin"], *ids["slots"]], [strings["begin"], *strings["slots"]]):
                hits = (input_ids == token_id).any(-1)
                if bool(hits.any()):
                    samples = hits.nonzero().flatten().tolist()
                    raise ValueError(
                        f"Sample(s) {samples} contain the token {text} (id {token_id}) of task '{task}', which this "
                        f"model does not enable (tasks={self.config.tasks}). Drop such samples or enable the task."
                    )

    def _check_task_labels(self, task_labels: torch.Tensor) -> None:
        if bool(torch.isin(task_labels, self._id_tensor("task_labels", self._valid_task_labels, task_labels)).all()):
            return
        allowed = [i for i, name in enumerate(ROUTER_CLASSES) if name == "text" or name in self.config.tasks]
        valid = task_labels == IGNORE_INDEX
        for label in allowed:
            valid |= task_labels == label
        if not bool(valid.all()):
            i = int((~valid).nonzero()[0])
            names = ", ".join(f"{k} ({ROUTER_CLASSES[k]})" for k in allowed)
            raise ValueError(
                f"Sample {i} has task label {int(task_labels[i])}; valid labels for this model are {names}, "
                f"or {IGNORE_INDEX} to ignore the sample."
            )

    # ----------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                 run_task_heads: bool = True, force_task: str | list[str | None] | None = None,
                 mask_video_mode: str = "propagate", mask_initial_boxes=None, **kwargs):
        """Generate text with the wrapped MLLM's own `generate` (its input preparation, caches and
        decoding strategies, all of transformers' options), then run the task heads for the task
        tokens the answers contain.

        During decoding a task's begin token is always followed by its slot tokens, and slot tokens
        are never produced otherwise. After decoding, the heads read the hidden states decoding computed
        (prefill + cached steps, collected by a hook on the backbone, re-laid out to right padding);
        where those do not cover the sequences (no KV cache, beam search, a slot as the very last
        token) one forward pass over the finished sequences replaces them. TPO-specific
        inputs (`frame_token_index`, `frame_timestamps`, `video_durations`, `query_token_mask`,
        `instruction_end_index`, `visual_token_xy`, `sam2_pixel_values`, `mask_query_index`,
        `sam2_batch_index`, ...) are used by that pass only; training targets are dropped.

        Args:
            input_ids, attention_mask: (batch, prompt_len) prompts, left-padded (the processor pads left
                for generation).
            run_task_heads: run the heads' pass (needs one sequence per prompt: with
                `num_return_sequences > 1` pass `run_task_heads=False`, or a ValueError is raised).
            force_task: one task name for every prompt, or per prompt a task name or None: that task's
                begin and slot tokens are appended to the prompt, so its head runs whatever the LM would
                generate (the text then continues after them). Prompts encoded by the processor in
                mode "force_task" (they end with the begin and slot tokens) work as they are, without it.
            mask_video_mode: "propagate" (default): a mask query with several SAM2 frames (a video) is
                segmented on its first frame by the mask head and tracked through the others with SAM2's
                video memory; "per_frame": every frame is prompted by the task embedding independently.
            mask_initial_boxes: optional tracking prompts, per sample a box or None ((batch, 4) or a
                list), (x0, y0, x1, y1) normalised to [0, 1] of the frame (SAM2 sees the whole frame
                resized, so the numbers hold at any size). A box replaces the task embedding on the
                first frame (SAM2's box prompt, the tracking setting) for that sample's mask queries;
                "propagate" mode only.
            sam2_pixel_values (`(m, 3, S, S)`): SAM2 inputs of the mask samples' images / frames, each
                sample's frames in time order; `sam2_batch_index` (`(m,)`) the sample of each. Without it,
                the collator's convention: `mask_query_index` numbers the mask samples (`task_labels` 3) in
                batch order.
            **kwargs: transformers' generation arguments and the MLLM's inputs (`pixel_values`, ...).

        Returns:
            A [`TPOGenerateOutput`] (sequences + per-sample `task_outputs`, see its docstring) unless
            `return_dict_in_generate=False` is asked for, which returns the sequences as transformers
            does (the heads are then skipped).
        """
        self._attach_task_token_hook()
        if mask_video_mode not in MASK_VIDEO_MODES:
            raise ValueError(f"Unknown mask_video_mode {mask_video_mode!r}; use one of {MASK_VIDEO_MODES}.")
        head_inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HEAD_ONLY_INPUTS or k.startswith(DENSE_PREFIX)}
        task_labels = kwargs.get("task_labels")  # the collator's: which samples carry SAM2 frames
        for key in _TRAINING_TARGETS:
            kwargs.pop(key, None)
        # Generation parameters go into a copy of the config (transformers warns when both are given).
        generation_config = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config)
        kwargs = generation_config.update(**kwargs)
        wants_dict = generation_config.return_dict_in_generate
        run_heads = run_task_heads and wants_dict and input_ids is not None
        if run_heads and (generation_config.num_return_sequences or 1) > 1:
            raise ValueError(_ONE_SEQUENCE_PER_PROMPT)
        batch = input_ids.shape[0] if input_ids is not None else 0
        initial_boxes = self._initial_boxes_per_sample(mask_initial_boxes, batch, mask_video_mode)
        if force_task is not None:
            input_ids, attention_mask = self._append_forced_tasks(force_task, input_ids, attention_mask, kwargs,
                                                                  head_inputs, generation_config.pad_token_id)
        generation_config.return_dict_in_generate = True
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(self.task_token_logits_processor())
        captured = [] if run_heads else None
        with self._capturing_hidden_states(captured):
            outputs = self.mllm.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=generation_config,
                logits_processor=processors,
                **kwargs,
            )
        if not wants_dict:
            return outputs.sequences
        result = TPOGenerateOutput(
            sequences=outputs.sequences,
            scores=getattr(outputs, "scores", None),
            logits=getattr(outputs, "logits", None),
            attentions=getattr(outputs, "attentions", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            cache=cache_of(outputs),
        )
        if run_heads:
            request = _MaskRequest(mode=mask_video_mode, initial_boxes=initial_boxes, task_labels=task_labels)
            result.head_outputs, result.task_outputs = self._heads_on_generated(
                outputs.sequences, input_ids, attention_mask, kwargs, head_inputs, generation_config, request,
                decoded_hidden_states=captured,
            )
        return result

    def task_token_logits_processor(self) -> TaskTokenLogitsProcessor:
        """Logits processor forcing slot tokens after begin tokens (see `generate`)."""
        next_forced, forbidden = {}, []
        for task in TASK_NAMES:
            ids = self.config.task_token_ids[task]
            if task not in self.config.tasks:
                forbidden += [ids["begin"], *ids["slots"]]
                continue
            chain = [ids["begin"], *ids["slots"]]
            next_forced.update(dict(zip(chain[:-1], chain[1:])))
            forbidden += ids["slots"]
        return TaskTokenLogitsProcessor(next_forced, forbidden)

    def _append_forced_tasks(self, force_task, input_ids, attention_mask, model_kwargs: dict, head_inputs: dict,
                             pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each prompt's forced task tokens (begin + slots) to the left-padded prompts. Per-token
        inputs (batch, prompt_len, ...) in `model_kwargs` / `head_inputs` are extended in place, and
        `instruction_end_index` keeps pointing at the last token of the original prompt."""
        if input_ids is None:
            raise ValueError("`force_task` appends task tokens to `input_ids`; pass the prompts as `input_ids`.")
        batch, prompt_len = input_ids.shape
        tasks = [force_task] * batch if isinstance(force_task, str) else list(force_task)
        if len(tasks) != batch:
            raise ValueError(f"`force_task` names {len(tasks)} task(s) for {batch} prompts; give one per prompt "
                             "(None for a prompt without a forced task).")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
            raise ValueError(f"Prompt(s) {rows} end with padding: `force_task` appends tokens after each prompt, "
                             "which needs left padding (the processor pads left for generation).")
        suffixes = []
        for i, task in enumerate(tasks):
            if task is not None and task not in self.config.tasks:
                raise ValueError(f"Sample {i}: `force_task` {task!r} is not a task of this model "
                                 f"(tasks={self.config.tasks}).")
            ids = []
            if task is not None:
                ids = [self.config.task_token_ids[task]["begin"], *self.config.task_token_ids[task]["slots"]]
            suffixes.append(torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))
        lengths = [s.numel() for s in suffixes]
        width = max(lengths)
        if width == 0:
            return input_ids, attention_mask
        for tensors in (model_kwargs, head_inputs):
            for key, value in list(tensors.items()):
                if (torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch, prompt_len)
                        and not key.startswith(DENSE_PREFIX)):
                    fill = _PER_TOKEN_FILL.get(key, 0)
                    tails = [torch.full((n, *value.shape[2:]), fill, dtype=value.dtype) for n in lengths]
                    tensors[key] = append_to_left_padded(value, tails, fill)
        extra = torch.tensor([width - n for n in lengths], device=input_ids.device)
        end = head_inputs.get("instruction_end_index")
        end = end.to(extra.device) if end is not None else torch.full_like(extra, prompt_len - 1)
        head_inputs["instruction_end_index"] = end + extra
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = [torch.ones(n, dtype=attention_mask.dtype) for n in lengths]
        attention_mask = append_to_left_padded(attention_mask, ones, 0)
        pad = pad_token_id if pad_token_id is not None else 0
        return append_to_left_padded(input_ids, suffixes, pad), attention_mask

    def _initial_boxes_per_sample(self, boxes, batch: int, mode: str) -> list[torch.Tensor | None]:
        """`mask_initial_boxes` checked and split per sample (None where a sample has none)."""
        if boxes is None:
            return [None] * batch
        if mode != "propagate":
            raise ValueError("`mask_initial_boxes` are tracking prompts: use them with mask_video_mode='propagate'.")
        rows = list(boxes)
        if len(rows) != batch:
            raise ValueError(f"`mask_initial_boxes` has {len(rows)} entries for {batch} prompts; give one per "
                             "prompt (None for a prompt without a box).")
        out = []
        for i, box in enumerate(rows):
            if box is not None:
                box = torch.as_tensor(box, dtype=torch.float32)
                check_normalised_box(box, f"Sample {i}")
            out.append(box)
        return out

    @contextlib.contextmanager
    def _capturing_hidden_states(self, captured: list | None):
        """Append the MLLM backbone's last hidden states of every call inside the block to `captured`
        (nothing when it is None): decoding's prefill (batch, prompt, hidden), then one (batch, 1, hidden)
        per step with a KV cache."""
        if captured is None:
            yield
            return

        def keep(module, args, output):
            states = getattr(output, "last_hidden_state", None)
            if states is None and isinstance(output, tuple) and output:
                states = output[0]
            captured.append(states.detach() if torch.is_tensor(states) else None)

        handle = self.mllm.base_model.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def _decoded_hidden_states(self, pieces: list | None, sequences: torch.Tensor, prompt_len: int,
                               shift: torch.Tensor) -> torch.Tensor | None:
        """The last hidden states of the whole generated sequences (batch, seq, hidden), right-aligned by
        `shift` like the heads' inputs, from decoding's prefill and cached steps; None when decoding was not
        one prefill then one token per step for these rows (beam search, no cache, ...) or when a slot token
        is the last token, which decoding never feeds: the heads' pass then runs the backbone."""
        if not pieces or any(p is None for p in pieces):
            return None
        batch, total = sequences.shape
        if pieces[0].shape[:2] != (batch, prompt_len) or any(p.shape[:2] != (batch, 1) for p in pieces[1:]):
            return None
        if len(pieces) != total - prompt_len:
            return None
        slot_ids = torch.tensor(self._all_slot_ids(), device=sequences.device)
        if total > prompt_len and bool(torch.isin(sequences[:, -1], slot_ids).any()):
            return None
        states = torch.cat([*pieces, pieces[0].new_zeros(batch, 1, pieces[0].shape[-1])], 1)[:, :total]
        return right_align(states, shift.to(states.device), 0.0)

    @torch.no_grad()
    def _heads_on_generated(self, sequences, input_ids, attention_mask, generate_kwargs, head_inputs, generation_config,
                            mask_request: "_MaskRequest", decoded_hidden_states: list | None = None):
        """The heads over the generated sequences (re-laid out to right padding, as in training), reading
        the slot tokens' hidden states from decoding (`decoded_hidden_states`, the backbone's outputs of
        every decoding call) or, where those do not cover the sequences, from one forward pass; mask
        queries of videos are then tracked (see `generate`)."""
        batch = input_ids.shape[0]
        if sequences.shape[0] != batch:
            raise ValueError(_ONE_SEQUENCE_PER_PROMPT)
        slot_ids = torch.tensor(self._all_slot_ids(), device=sequences.device)
        if not bool(torch.isin(sequences, slot_ids).any()):
            return None, [None] * batch
        inputs = self._generated_as_right_padded(sequences, input_ids, attention_mask, generate_kwargs, head_inputs,
                                                 generation_config)
        mask_queries = self._locate_task_queries(inputs["input_ids"]).get("mask")
        plan = None
        if mask_queries is not None and mask_queries.batch_index.numel():
            plan = self._plan_generated_masks(mask_queries.batch_index, inputs, mask_request)
        else:
            for key in ("sam2_pixel_values", "mask_query_index", "sam2_batch_index", *_MASK_IMAGE_KEYS):
                inputs.pop(key, None)
        hidden = self._decoded_hidden_states(decoded_hidden_states, sequences, input_ids.shape[1],
                                             inputs.pop("_shift"))
        if hidden is not None:
            inputs["backbone_hidden_states"] = hidden
        # The heads read hidden states only: one logit row instead of (seq, vocab) per sample.
        outputs = self(**inputs, use_cache=False, logits_to_keep=1)
        mask_results = self._generated_mask_results(outputs.mask_outputs, plan) if plan is not None else None
        return outputs, self._task_outputs_per_sample(outputs, batch, mask_results)

    def _generated_as_right_padded(self, sequences, input_ids, attention_mask, generate_kwargs, head_inputs,
                                   generation_config) -> dict:
        """The forward inputs of the heads' pass: sequences (batch, prompt + new) moved to right padding,
        per-token inputs extended over the generated tokens, `instruction_end_index` shifted. Slot tokens
        of a run cut by `max_new_tokens` are masked out (that query is dropped)."""
        batch, prompt_len = input_ids.shape
        new_tokens = sequences[:, prompt_len:]
        eos = generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
        prompt_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        new_mask = generated_attention_mask(new_tokens, eos, generation_config.pad_token_id)
        full_mask = torch.cat([prompt_mask, new_mask], 1)
        cut = torch.zeros_like(sequences, dtype=torch.bool)
        for task in self.config.tasks:
            cut |= incomplete_slot_runs(sequences, self.config.task_token_ids[task]["slots"])
        cut[:, :prompt_len] = False
        if bool(cut.any()):
            logger.warning("Sample(s) %s: the answer ends inside a run of slot tokens (max_new_tokens reached); "
                           "that task query is dropped.", cut.any(-1).nonzero().flatten().tolist())
            sequences, full_mask = sequences.masked_fill(cut, pad), full_mask.masked_fill(cut, 0)
        shift = (full_mask.cumsum(-1) == 0).sum(-1)  # leading (left) padding per row
        inputs = {"input_ids": right_align(sequences, shift, pad), "attention_mask": right_align(full_mask, shift, 0)}
        per_token = {**{k: v for k, v in generate_kwargs.items() if isinstance(v, torch.Tensor)}, **head_inputs}
        for key, value in per_token.items():
            if (key not in _NOT_PER_TOKEN and not key.startswith(DENSE_PREFIX) and isinstance(value, torch.Tensor)
                    and value.dim() >= 2
                    and tuple(value.shape[:2]) == (batch, prompt_len)):
                fill = _PER_TOKEN_FILL.get(key, 0)
                extension = torch.full((batch, new_tokens.shape[1], *value.shape[2:]), fill, dtype=value.dtype,
                                       device=value.device)
                value = right_align(torch.cat([value, extension], 1), shift, fill)
            elif key == "instruction_end_index":
                value = value - shift.to(value.device)
            inputs[key] = value
        inputs.setdefault("instruction_end_index", (prompt_mask.sum(-1) - 1).clamp(min=0))
        inputs["_shift"] = shift
        return inputs

    # ---- masks of generated queries: SAM2 frames per query, tracking --------------------------------
    def _plan_generated_masks(self, mask_batch_index: torch.Tensor, inputs: dict,
                              request: "_MaskRequest") -> "_MaskPlan":
        """Give each mask query (sample `mask_batch_index[q]`) its sample's SAM2 frames; tracked queries
        get only their first frame in the forward pass (the others are reached by propagation).
        Replaces the SAM2 inputs of `inputs` by those of the forward pass."""
        pixels = inputs.pop("sam2_pixel_values", None)
        image_query, image_sample = inputs.pop("mask_query_index", None), inputs.pop("sam2_batch_index", None)
        per_image = {key: inputs.pop(key) for key in _MASK_IMAGE_KEYS if inputs.get(key) is not None}
        forward_per_image = {key: [] for key in per_image}
        batch = inputs["input_ids"].shape[0]
        if pixels is not None:
            image_sample = self._sam2_sample_index(pixels.shape[0], image_query, image_sample, request.task_labels,
                                                   batch)
        plan = _MaskPlan()
        for b in mask_batch_index.tolist():
            rows = (image_sample.to(pixels.device) == b).nonzero().flatten() if pixels is not None else []
            if len(rows) == 0:
                raise self._missing_sam2_error(b, inputs)
            frames, box = pixels[rows], request.initial_boxes[b] if request.initial_boxes else None
            plan.samples.append(b)
            plan.frames.append(frames)
            plan.tracked.append(request.mode == "propagate" and (frames.shape[0] > 1 or box is not None))
            plan.initial_boxes.append(box)
            for key, value in per_image.items():
                own = value[rows.to(value.device)]
                forward_per_image[key].append(own[:1] if plan.tracked[-1] else own)
        forward_frames = [f[:1] if tracked else f for f, tracked in zip(plan.frames, plan.tracked)]
        inputs["sam2_pixel_values"] = torch.cat(forward_frames)
        inputs.update({key: torch.cat(values) for key, values in forward_per_image.items()})
        inputs["mask_query_index"] = torch.cat([torch.full((f.shape[0],), q, dtype=torch.long, device=f.device)
                                                for q, f in enumerate(forward_frames)])
        return plan

    @staticmethod
    def _sam2_sample_index(num_images: int, image_query, image_sample, task_labels, batch: int) -> torch.Tensor:
        """(m,) the sample of each SAM2 image: `sam2_batch_index` if given, else the collator's convention
        (`mask_query_index` numbers the mask samples, `task_labels == 3`, in batch order)."""
        if image_sample is not None:
            if image_sample.numel() != num_images:
                raise ValueError(f"`sam2_batch_index` has {image_sample.numel()} entries for {num_images} SAM2 images.")
            return image_sample.long()
        hint = "pass `sam2_batch_index` (m,), the sample of each SAM2 image."
        if image_query is None:
            if num_images != batch:
                raise ValueError(f"{num_images} SAM2 images for {batch} prompts: {hint}")
            return torch.arange(batch)
        image_query = image_query.long()
        count = int(image_query.max()) + 1 if image_query.numel() else 0
        if task_labels is not None:
            owners = (task_labels == ROUTER_CLASSES.index("mask")).nonzero().flatten()
        else:
            owners = torch.arange(batch) if count == batch else None
        if owners is None or owners.numel() != count:
            raise ValueError(f"Cannot tell which sample each SAM2 image belongs to (`mask_query_index` names {count} "
                             f"mask sample(s) in a batch of {batch}): {hint}")
        return owners.to(image_query.device)[image_query]

    def _missing_sam2_error(self, sample: int, inputs: dict) -> ValueError:
        frames = 0
        timestamps = inputs.get("frame_timestamps")
        if timestamps is not None:
            frames = int((timestamps[sample] >= 0).sum())
        elif inputs.get("frame_token_index") is not None:
            frames = int(inputs["frame_token_index"][sample].max()) + 1
        what = f"its video has {frames} frame(s) for the MLLM but no SAM2 frames" if frames else "it has no SAM2 image"
        slot = self.config.task_token_strings["mask"]["slots"][0]
        return ValueError(
            f"Sample {sample} asks for a mask ({slot}) but {what}: give its images/frames at SAM2's input size as "
            "`sam2_pixel_values` (TPOProcessor.sam2_inputs; the collator does it for mask samples, from "
            "`sam2_frames` for videos) with `sam2_batch_index` naming the sample of each."
        )

    def _generated_mask_results(self, mask_outputs: dict, plan: "_MaskPlan") -> list[dict]:
        """Per mask query, its masks: tracked from the forward pass's first-frame mask, or per frame."""
        logits, query_index = mask_outputs["pred_mask_logits"], mask_outputs["query_index"]
        results = []
        for q, (frames, tracked) in enumerate(zip(plan.frames, plan.tracked)):
            own = logits[query_index == q]
            if not tracked:
                results.append(_per_frame_masks(own))
                continue
            tracks = self.track_masks(frames, first_frame_mask_logits=own[:1], initial_boxes=[plan.initial_boxes[q]],
                                      batch_index=[plan.samples[q]])
            results.append({**{k: tracks[0][k] for k in ("mask_logits", "boxes", "visible")}, "mode": "propagate"})
        return results

    @torch.no_grad()
    def track_masks(self, sam2_pixel_values: torch.Tensor, mask_query_index: torch.Tensor | None = None,
                    task_embeddings: torch.Tensor | None = None, first_frame_mask_logits: torch.Tensor | None = None,
                    initial_boxes=None, threshold: float = 0.0, batch_index=None) -> list[dict]:
        """Segment each mask query's video by propagation through SAM2's video memory (tracking).

        The first frame's mask comes, in this order of precedence, from the query's initial box (SAM2's
        box prompt alone: the tracking setting), from `first_frame_mask_logits`, or from the mask head
        prompted by the query's task embedding; SAM2's memory carries it through the other frames.

        Args:
            sam2_pixel_values: (m, 3, S, S) SAM2 inputs, each query's frames in time order.
            mask_query_index: (m,) the query of each frame (default: all frames belong to one query).
            task_embeddings: (q, k, hidden) the queries' task embeddings (`mask_outputs["task_embeddings"]`
                of a forward pass).
            first_frame_mask_logits: (q, h, w) a first-frame mask per query (e.g. `pred_mask_logits` of a
                forward pass on the first frames), at any size.
            initial_boxes: optional (q, 4) or a list of (4,) / None: a user box on each query's first frame,
                (x0, y0, x1, y1) normalised to [0, 1] of the frame (pixels / (width, height, width, height)).
            threshold: logit threshold of the masks.
            batch_index: optional (q,) sample of each query, named in error messages.
        Returns:
            Per query: `mask_logits` (T, S, S), `boxes` (T, 4) normalised (x0, y0, x1, y1) of the
            thresholded masks (`masks_to_boxes` / S; zeros where a mask is empty), `boxes_xyxy_sam2`
            (T, 4) the same in SAM2 input pixels, `visible` (T,) bool.
        """
        if self.mask_head is None:
            raise ValueError(f"This model has no mask head (tasks={self.config.tasks}); tracking needs the mask task.")
        if mask_query_index is None:
            mask_query_index = torch.zeros(sam2_pixel_values.shape[0], dtype=torch.long)
        mask_query_index = mask_query_index.to(sam2_pixel_values.device).long()
        num_queries = int(mask_query_index.max()) + 1 if mask_query_index.numel() else 0
        boxes = [None] * num_queries if initial_boxes is None else list(initial_boxes)
        if len(boxes) != num_queries:
            raise ValueError(f"{len(boxes)} initial box(es) for {num_queries} mask queries; give one per query "
                             "(or None).")
        size = self.mask_head.image_size
        results = []
        for q in range(num_queries):
            name = f"Sample {int(batch_index[q])}" if batch_index is not None else f"Mask query {q}"
            frames = sam2_pixel_values[mask_query_index == q]
            if frames.shape[0] == 0:
                raise ValueError(f"{name}: `mask_query_index` gives its mask query no SAM2 frame.")
            prompt = {}
            if boxes[q] is not None:
                box = torch.as_tensor(boxes[q], dtype=torch.float32)
                check_normalised_box(box, name)
                prompt["initial_box"] = box.reshape(4).to(frames.device) * size
            elif first_frame_mask_logits is not None:
                prompt["initial_mask_logits"] = first_frame_mask_logits[q]
            elif task_embeddings is None:
                raise ValueError(f"{name}: tracking needs a first-frame prompt: `task_embeddings`, "
                                 "`first_frame_mask_logits` or an initial box.")
            embedding = task_embeddings[q] if task_embeddings is not None else None
            out = self.mask_head.track(embedding, frames, threshold=threshold, **prompt)
            results.append({"mask_logits": out["mask_logits"], "boxes": out["boxes_xyxy"] / size,
                            "boxes_xyxy_sam2": out["boxes_xyxy"], "visible": out["visible"]})
        return results

    def _all_slot_ids(self) -> list[int]:
        return [i for t in self.config.tasks for i in self.config.task_token_ids[t]["slots"]]

    def _task_outputs_per_sample(self, outputs: "TPOOutput", batch: int, mask_results: list[dict] | None = None
                                 ) -> list[dict | None]:
        """Split the heads' batched outputs per sample (normalised coordinates, as the heads give them).
        `mask_results`: per mask query its masks (default: the forward pass's, per frame)."""
        per_sample: list[dict] = [{} for _ in range(batch)]
        if outputs.pred_boxes is not None:
            for b in range(batch):
                rows = outputs.pred_boxes_batch_index == b
                if bool(rows.any()):
                    per_sample[b]["region"] = {"boxes": outputs.pred_boxes[rows]}
        temporal = outputs.temporal_outputs
        if temporal:
            windows = self.temporal_head.predict_windows(temporal)
            for q, b in enumerate(temporal["batch_index"].tolist()):
                entry = per_sample[b].setdefault("temporal", {"windows": [], "saliency": [], "frame_times": []})
                entry["windows"].append(windows[q])
                entry["saliency"].append(temporal["pred_saliency"][q][temporal["frame_mask"][q]])
                entry["frame_times"].append(temporal["frame_times"][q][temporal["frame_mask"][q]])
        mask = outputs.mask_outputs
        if mask:
            if mask_results is None:
                mask_results = [_per_frame_masks(mask["pred_mask_logits"][mask["query_index"] == q])
                                for q in range(mask["batch_index"].numel())]
            for q, b in enumerate(mask["batch_index"].tolist()):
                entry = per_sample[b].setdefault("mask", {"mask_logits": [], "boxes": [], "visible": [], "mode": []})
                for key, values in entry.items():
                    values.append(mask_results[q][key])
        return [entry or None for entry in per_sample]

    def lora_target_regex(self) -> str:
        """A regex for peft's `target_modules` matching every linear layer of the language model."""
        decoder = self.mllm.get_decoder()
        prefix = next(name for name, module in self.named_modules() if module is decoder)
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, nn.Linear)})
        return re.escape(prefix) + r"\..*\.(" + "|".join(leaves) + ")"

    def task_module_names(self) -> list[str]:
        """Names of the TPO modules outside the MLLM that train (for peft's `modules_to_save`): the task
        tokens, router, region and temporal heads, and of the mask head its prompt MLP and the SAM2
        parts that are not frozen (never the whole SAM2)."""
        names = [name for name, child in self.named_children() if name not in ("mllm", "mask_head") and child is not None]
        if self.mask_head is not None:
            settings = self.config.mask_head_config
            names.append("mask_head.prompt_mlp")
            if self.mask_head.localiser is not None:
                names.append("mask_head.localiser")
            if self.mask_head.box_regressor is not None:
                names.append("mask_head.box_regressor")
            for flag, module in (("freeze_mask_decoder", "mask_decoder"), ("freeze_prompt_encoder", "prompt_encoder"),
                                 ("freeze_image_encoder", "vision_encoder")):
                if not settings.get(flag, True):
                    names.append(f"mask_head.sam2.{module}")
        return names


def _require_grad_if_trained(layers: list[nn.Module], module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook of an input embedding: its output requires grad if one of `layers` has a trainable parameter."""
    if torch.is_tensor(output) and any(p.requires_grad for layer in layers for p in layer.parameters()):
        output.requires_grad_(True)


def _cache_argument(module: nn.Module) -> str:
    """The name under which `module.forward` takes the KV cache: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_of(outputs: ModelOutput):
    """The KV cache of a transformers output, whichever name the installed release gives it."""
    for name in ("cache", "past_key_values"):
        if name in outputs.keys():
            return outputs[name]
    return None


def _per_frame_masks(mask_logits: torch.Tensor, threshold: float = 0.0) -> dict:
    """(T, h, w) mask logits of one query -> its masks entry: logits, normalised (T, 4) boxes of the
    thresholded masks (zeros where empty), visibility (T,)."""
    binary = mask_logits > threshold
    height, width = mask_logits.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=mask_logits.device)
    return {"mask_logits": mask_logits, "boxes": masks_to_boxes(binary) / scale, "visible": binary.flatten(1).any(1),
            "mode": "per_frame"}


def _labelled_positions(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq, hidden) hidden states and (batch, seq) labels -> the hidden states (n, hidden) of the n positions
    whose next token is a label and those labels (n,): what the shifted LM loss reads, without the other logits."""
    # the token each position predicts
    targets = F.pad(labels.to(hidden_states.device), (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden_states[keep], targets[keep]


def _xyxy_scale_offset(transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, 4) per-axis maps (a_x, b_x, a_y, b_y) -> (m, 4) scales and offsets for (x0, y0, x1, y1) boxes."""
    scale = transform[:, [0, 2, 0, 2]]
    offset = transform[:, [1, 3, 1, 3]]
    return scale, offset


def _cxcywh_to_clamped_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1) clamped to [0, 1]."""
    centre, half = boxes[..., :2], 0.5 * boxes[..., 2:]
    return torch.cat([centre - half, centre + half], dim=-1).clamp(0.0, 1.0)


BOX_TOLERANCE = 1e-4  # normalised box coordinates may exceed [0, 1] by this much (rounding)


def _invalid_box_rows(boxes: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the rows of (n, 4) (x0, y0, x1, y1) boxes that are not finite, ordered and within [0, 1]
    (+- BOX_TOLERANCE)."""
    boxes = boxes.float()
    excess = torch.cat([boxes[:, :2] - boxes[:, 2:], (boxes - 0.5).abs() - (0.5 + BOX_TOLERANCE)], dim=-1)
    return ~(excess <= 0).all(-1)  # NaN compares false: invalid


def _add_task_tokens(mllm: PreTrainedModel, token_strings: dict, tokenizer=None) -> dict:
    """Add every task's begin and slot tokens to `tokenizer` (if given) and to the MLLM's embeddings.

    Returns `{task: {"begin": id, "slots": [ids]}}`. The embedding rows (input and output) of the tokens added
    here, and any rows the resize adds, are set to the mean of the rows of the tokenizer's vocabulary. A
    checkpoint whose embeddings have more rows than its tokenizer has tokens (Qwen2-VL, Qwen2.5-VL: 152,064 rows,
    151,665 tokens) takes the new tokens in those untrained padding rows, without a resize.
    """
    ordered = [(task, kind, s) for task, entry in token_strings.items() for kind, s in
               [("begin", entry["begin"])] + [("slots", s) for s in entry["slots"]]]
    old_rows = mllm.get_input_embeddings().weight.shape[0]
    if tokenizer is not None:
        text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        known_tokens = len(text_tokenizer)
        text_tokenizer.add_special_tokens(
            {"extra_special_tokens": [s for _, _, s in ordered]}, replace_extra_special_tokens=False
        )
        ids = text_tokenizer.convert_tokens_to_ids([s for _, _, s in ordered])
        new_rows = max(old_rows, len(text_tokenizer), max(ids) + 1)
        added = [i for i in ids if i >= known_tokens]  # tokens the tokenizer already had keep their rows
        vocabulary_rows = min(known_tokens, old_rows)
    else:
        ids = list(range(old_rows, old_rows + len(ordered)))
        new_rows = old_rows + len(ordered)
        added, vocabulary_rows = ids, old_rows
    if new_rows > old_rows:
        with init.no_init_weights():  # every new row is set below: no random draw over the whole resized matrix
            mllm.resize_token_embeddings(new_rows, mean_resizing=False)
    _set_rows_to_mean(mllm, sorted(set(added) | set(range(old_rows, new_rows))), vocabulary_rows)
    table = {task: {"begin": None, "slots": []} for task in token_strings}
    for (task, kind, _), token_id in zip(ordered, ids):
        if kind == "begin":
            table[task]["begin"] = int(token_id)
        else:
            table[task]["slots"].append(int(token_id))
    return table


@torch.no_grad()
def _set_rows_to_mean(mllm: PreTrainedModel, rows: list[int], vocabulary_rows: int) -> None:
    """Set `rows` of the input and output embeddings (and an output bias) to the mean of their first
    `vocabulary_rows` rows (the tokenizer's vocabulary)."""
    if not rows:
        return
    for embedding in (mllm.get_input_embeddings(), mllm.get_output_embeddings()):
        if embedding is None:
            continue
        index = torch.tensor(rows, device=embedding.weight.device)
        embedding.weight[index] = _row_mean(embedding.weight, vocabulary_rows).to(embedding.weight.dtype)
        bias = getattr(embedding, "bias", None)
        if bias is not None and bias.shape[0] == embedding.weight.shape[0]:
            bias[index] = bias[:vocabulary_rows].mean()
    logger.info("Embedding rows %s (task tokens) set to the mean of the %d vocabulary rows.", rows, vocabulary_rows)


def _row_mean(weight: torch.Tensor, rows: int, chunk: int = 8192) -> torch.Tensor:
    """Mean of `weight[:rows]` over its rows, in float32, accumulated `chunk` rows at a time: a bf16 reduction on a
    CPU first copies its whole input to float32 (2.2 GB for a 152k x 3584 embedding)."""
    total = torch.zeros(weight.shape[1:], dtype=torch.float32, device=weight.device)
    for start in range(0, rows, chunk):
        total += weight[start:min(start + chunk, rows)].sum(0, dtype=torch.float32)
    return total / max(rows, 1)


TPOForConditionalGeneration.register_for_auto_class("AutoModel")
TPOForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["TPOForConditionalGeneration", "TPOPreTrainedModel", "TPOOutput"]
