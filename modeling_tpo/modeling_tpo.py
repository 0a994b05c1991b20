"""TPO model: an existing transformers vision-language model with task tokens, a task router and
task heads (region, temporal, mask).

This file is copied next to saved checkpoints as remote code: it imports only torch,
transformers and its sibling files (relative imports), nothing optional at module level.
"""

import contextlib
import copy
import functools
import logging
import re
from collections import Counter
from dataclasses import dataclass
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep

from .box_ops import masks_to_boxes
from .configuration_tpo import CUSTOM_PIPELINES, IGNORE_INDEX, ROUTER_CLASSES, TASK_NAMES, TPOConfig
from .features import dense_clip_frames, gather_token_features, normalised_frame_times, pool_frame_features
from .generation_tpo import TPOGenerationMixin, accepts_past_key_values, cache_argument, cache_of, past_key_values_alias
from .inputs_tpo import DENSE_PREFIX, MaskInputs, RegionInputs, TemporalInputs
from .region_head import RegionHead, RegionHeadOutput
from .targets_tpo import TPOTargetsMixin
from .task_tokens import TaskRouter, TaskTokens
from .temporal_head import TemporalHead, TemporalHeadOutput
from .temporal_loss import mean_spans_per_process

logger = logging.getLogger(__name__)

# Inputs used only by the heads' pass of `generate` (not by the MLLM's decoding).

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
    temporal_outputs (`TemporalHeadOutput`): the temporal head's outputs for the temporal queries (see
        `TemporalHead.forward`: `pred_spans` (q, num_moments, 2) normalised (center, width),
        `pred_logits`, `pred_saliency` (q, frames)) plus `batch_index` (q,) and `frame_mask`.
    mask_outputs (`MaskHeadOutput`): the mask head's outputs (`pred_mask_logits` (m, h, w) per SAM2 image,
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
    temporal_outputs: TemporalHeadOutput | None = None
    mask_outputs: ModelOutput | None = None  # MaskHeadOutput (mask_head.py loads with the mask task only)
    cache: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

    past_key_values = past_key_values_alias


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


def _unused_heads_need_gradients() -> bool:
    """Only data-parallel training (DDP, FSDP, DeepSpeed: torch.distributed initialised) needs every
    trainable parameter to get a gradient at every step; a single process skips the zero-touch term, which
    costs one small op per parameter."""
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


class TPOForConditionalGeneration(TPOGenerationMixin, TPOTargetsMixin, TPOPreTrainedModel, GenerationMixin):
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
        # each head from its typed settings (`RegionHeadConfig`, ...), which the config keeps as plain dicts
        self.region_head = None
        if "region" in config.tasks:
            self.region_head = RegionHead(hidden_size, config.head_settings("region"))
        self.temporal_head = None
        if "temporal" in config.tasks:
            self.temporal_head = TemporalHead(hidden_size, config.head_settings("temporal"))
        self.mask_head = None
        if "mask" in config.tasks:
            from .mask_head import MaskHead

            self.mask_head = MaskHead(hidden_size, config.sam2_config, config.head_settings("mask"))

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
        back-propagated at every step for nothing. Here each hook first checks that some
        `GradientCheckpointingLayer` of its sub-model trains (LoRA in the LLM, `train_vision_tower`), so that
        reentrant checkpointing still gives those layers their gradients.
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
        # (..., hidden) gradient over the batch dimensions.
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
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
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
        The TPO inputs below are declared once, with their shapes and kinds, in `inputs_tpo.py` (`SharedInputs`,
        `LMTargets`, `RegionInputs`, `TemporalInputs`, `MaskInputs`); each head gets its own dataclass.

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
        self._check_inputs(input_ids, task_labels, kwargs, cache, backbone_given=backbone_hidden_states is not None)

        if backbone_hidden_states is not None:
            backbone_outputs = BaseModelOutputWithPast(last_hidden_state=backbone_hidden_states)
        else:
            backbone_outputs = self._run_backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = backbone_outputs.last_hidden_state  # (batch, seq, hidden)
        logits, lm_targets = self._lm_logits(hidden_states, labels, logits_to_keep)

        weights = self.loss_weights
        computing_loss = labels is not None or task_labels is not None
        terms: dict[str, torch.Tensor] = {}
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
        head_inputs = {
            "region": RegionInputs(region_boxes=region_boxes, region_batch_index=region_batch_index),
            "temporal": TemporalInputs(temporal_spans=temporal_spans, temporal_span_query_index=temporal_span_query_index,
                                       temporal_saliency=temporal_saliency),
            "mask": MaskInputs(sam2_pixel_values=sam2_pixel_values, mask_query_index=mask_query_index,
                               mask_targets=mask_targets, mask_frame_index=mask_frame_index,
                               mask_view_to_sam2=mask_view_to_sam2),
        }
        predictions, head_terms, finer, untouched = self._run_heads(context, head_inputs)
        terms.update(head_terms)
        loss = self._total_loss(terms, untouched, computing_loss, hidden_states.device)
        loss_dict = {name: value.detach() for name, value in {**terms, **finer}.items()}
        region = predictions.get("region") or RegionHeadOutput()

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

    def _check_inputs(self, input_ids, task_labels, mllm_inputs: dict, cache, backbone_given: bool) -> None:
        """Refuse disabled tasks' tokens, invalid task labels and placeholders without pixels (see `targets_tpo`)."""
        if input_ids is not None:
            self._check_task_tokens(input_ids)
        if task_labels is not None:
            self._check_task_labels(task_labels)
        if input_ids is not None and not backbone_given:
            self._check_visual_inputs(input_ids, mllm_inputs, cache)

    def _lm_logits(self, hidden_states: torch.Tensor, labels, logits_to_keep) -> tuple[torch.Tensor, dict]:
        """The LM head's logits, and the LM loss's extra targets: with `labels` and `config.labelled_logits_only`,
        only at the positions that predict a label (`shift_labels` then given)."""
        lm_targets = {}
        every_position = isinstance(logits_to_keep, int) and not logits_to_keep
        if labels is not None and self.config.labelled_logits_only and every_position:
            labelled_hidden, lm_targets["shift_labels"] = _labelled_positions(hidden_states, labels)
            return self.mllm.get_output_embeddings()(labelled_hidden), lm_targets  # (num_labelled, vocab)
        return self.mllm.get_output_embeddings()(slice_logits_to_keep(hidden_states, logits_to_keep)), lm_targets

    def _run_heads(self, context: "_HeadContext", head_inputs: dict) -> tuple[dict, dict, dict, list]:
        """Each enabled head on its typed inputs: {task: predictions}, {task: its loss term}, the finer terms, and
        the tasks whose head gave no loss term (or was skipped: weight 0 in this training stage)."""
        heads = {"region": self._region_outputs, "temporal": self._temporal_outputs, "mask": self._mask_outputs}
        weights = self.loss_weights
        predictions, terms, finer, untouched = {}, {}, {}, []
        for task in self._tasks:
            if context.computing_loss and weights[task] == 0:  # not trained in this stage: skip the head
                untouched.append(task)
                continue
            task_predictions, task_terms = heads[task](context, head_inputs[task])
            predictions[task] = task_predictions
            if task_terms:
                terms[task] = task_terms.pop(task)
                finer.update(task_terms)
            else:
                untouched.append(task)
        return predictions, terms, finer, untouched

    def _total_loss(self, terms: dict, untouched: list, computing_loss: bool, device) -> torch.Tensor | None:
        """The weighted sum of the loss terms (None when nothing is computed)."""
        if not (computing_loss or terms):
            return None
        weights = self.loss_weights
        loss = sum(weights[name] * value.float() for name, value in terms.items())
        # Under data parallelism, heads without samples in this batch still get (zero) gradients: DDP
        # needs no `find_unused_parameters` for mixed-task batches.
        touch = None
        if _unused_heads_need_gradients():
            heads = {"region": self.region_head, "temporal": self.temporal_head, "mask": self.mask_head}
            touch = _zero_touch(*(heads[task] for task in untouched))
        loss = loss + touch if touch is not None else loss
        if not torch.is_tensor(loss):
            loss = torch.zeros((), device=device)
        return loss

    # ----------------------------------------------------------------------------------------------
    # Heads
    # ----------------------------------------------------------------------------------------------
    def _region_outputs(self, context: "_HeadContext", inputs: RegionInputs):
        """Region predictions (normalised xyxy boxes, one per query) and, with targets, loss terms."""
        region_boxes, region_batch_index = inputs.region_boxes, inputs.region_batch_index
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
            predictions = RegionHeadOutput(pred_boxes=_cxcywh_to_clamped_xyxy(boxes_cxcywh),
                                           batch_index=queries.batch_index)
        if region_boxes is not None:
            matched = self._match_targets("region", queries, region_boxes, region_batch_index)
            if has_queries:
                terms = self.region_head.loss(boxes_cxcywh, matched, token_scores, visual.get("visual_xy"))
        return predictions, terms

    def _temporal_outputs(self, context: "_HeadContext", inputs: TemporalInputs):
        """Temporal predictions for the temporal queries and, with targets, loss terms.

        Frame features are the means of each frame's visual-token hidden states; the query features are
        the hidden states of the instruction's text tokens of the query's sample.
        """
        spans, span_query_index = inputs.temporal_spans, inputs.temporal_span_query_index
        saliency = inputs.temporal_saliency
        queries = context.queries.get("temporal")
        has_queries = queries is not None and queries.batch_index.numel() > 0
        num_spans = None
        if context.computing_loss and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process computes this at every training step (with or without temporal samples),
            # so the collective always matches across processes.
            local = spans.shape[0] if (spans is not None and has_queries) else 0
            num_spans = mean_spans_per_process(local, context.hidden_states.device)
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
        predictions = TemporalHeadOutput(**{**outputs, "batch_index": sample, "frame_mask": frame_mask,
                                            "frame_times": frame_times})
        if spans is None:
            return predictions, {}
        targets = self._temporal_targets(queries, spans, span_query_index, saliency, num_frames)
        return predictions, self.temporal_head.loss(outputs, targets, num_spans)

    def _mask_outputs(self, context: "_HeadContext", inputs: MaskInputs):
        """Mask logits for every SAM2 image of the mask queries and, with targets, loss terms."""
        from .mask_head import MaskHeadOutput  # the mask head's module (SAM2) loads only with the mask task

        sam2_pixel_values, mask_query_index, mask_targets = (inputs.sam2_pixel_values, inputs.mask_query_index,
                                                             inputs.mask_targets)
        mask_frame_index, mask_view_to_sam2 = inputs.mask_frame_index, inputs.mask_view_to_sam2
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
        forcing = self.mask_head.settings.box_prompt_teacher_forcing
        if input_boxes is not None and mask_targets is not None and self.training and forcing > 0:
            input_boxes = self._teacher_forced_boxes(input_boxes, mask_targets, forcing)
        outputs = self.mask_head(task_embeddings, sam2_pixel_values=sam2_pixel_values,
                                 query_index=mask_query_index, input_boxes=input_boxes)
        predictions = MaskHeadOutput(**{**outputs, "query_index": mask_query_index, "batch_index": queries.batch_index,
                                        "task_embeddings": task_embeddings, "prompt_boxes_xyxy_sam2": input_boxes})
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

    def _teacher_forced_boxes(self, boxes: torch.Tensor, mask_targets: torch.Tensor, rate: float) -> torch.Tensor:
        """`boxes` (m, 4) SAM2 input pixels with each image that shows its object replaced, with probability `rate`,
        by its GT mask's box (`mask_targets` (m, S, S), the same frame of reference scaled to SAM2's input)."""
        binary = mask_targets > 0.5
        height, width = binary.shape[-2:]
        scale = torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype)
        gt = masks_to_boxes(binary).to(boxes.device, boxes.dtype) / scale * self.mask_head.image_size
        chosen = torch.rand(boxes.shape[0], device=boxes.device) < rate
        use = chosen & binary.flatten(1).any(-1).to(boxes.device)
        return torch.where(use[:, None], gt, boxes)

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
            inputs[cache_argument(self.mllm.base_model)] = cache
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
