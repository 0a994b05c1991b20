"""Generation with task tokens: `TPOGenerationMixin` (`generate`, forced tasks, the heads' pass over the
generated sequences, mask planning and tracking), slot forcing during decoding, and the re-layout helpers.

Remote code: torch and transformers only.
"""

import contextlib
import copy
import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .box_ops import NORMALISED_TOLERANCE, masks_to_boxes
from .configuration_tpo import ROUTER_CLASSES, TASK_NAMES
from .inputs_tpo import (
    DENSE_PREFIX,
    HEAD_ONLY_INPUTS,
    MASK_IMAGE_KEYS,
    NOT_PER_TOKEN,
    PER_TOKEN_FILL,
    SAM2_IMAGE_INPUTS,
    TRAINING_TARGETS,
)

logger = logging.getLogger(__name__)


# ---- The KV cache's name: `cache` since transformers 5.24, `past_key_values` before (the one shim) ----------------
CACHE_RENAMED_IN = "5.24.0"
# `forward(past_key_values=...)` is taken as `cache=...` (silently from 5.24 on; with a FutureWarning before)
accepts_past_key_values = deprecate_kwarg("past_key_values", version=CACHE_RENAMED_IN, new_name="cache")
# `outputs.past_key_values` of TPO's outputs reads their `cache`
past_key_values_alias = property(lambda self: self.cache,
                                 doc="The KV cache under its name before transformers 5.24 (`cache` since).")


def cache_argument(module: nn.Module) -> str:
    """The name under which `module.forward` takes the KV cache: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_of(outputs: ModelOutput):
    """The KV cache of a transformers output, whichever name the installed release gives it."""
    for name in ("cache", "past_key_values"):
        if name in outputs.keys():
            return outputs[name]
    return None


class TaskTokenLogitsProcessor(LogitsProcessor):
    """After a task's begin token, force its slot tokens (in order); never sample a slot token
    otherwise, nor any token of a task the model does not enable.

    Args:
        next_forced: {token id: the token id that must follow it} (begin -> slot 0, slot j -> slot j+1).
        forbidden: ids never to be generated freely (every slot token, disabled tasks' tokens).
    """

    def __init__(self, next_forced: dict[int, int], forbidden: list[int]):
        self.next_forced = next_forced
        self.forbidden = forbidden
        self._tables: dict = {}

    def _table(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (vocab_size, device)
        if key not in self._tables:
            forced = torch.full((vocab_size,), -1, dtype=torch.long)
            for source, target in self.next_forced.items():
                if source < vocab_size:
                    forced[source] = target
            forbidden = torch.tensor([i for i in self.forbidden if i < vocab_size], dtype=torch.long)
            self._tables[key] = (forced.to(device), forbidden.to(device))
        return self._tables[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced_table, forbidden = self._table(scores.shape[-1], scores.device)
        scores = scores.clone()
        lowest = torch.finfo(scores.dtype).min
        scores[:, forbidden] = lowest
        forced = forced_table[input_ids[:, -1].clamp(0, forced_table.numel() - 1)]  # (batch,)
        rows = forced >= 0
        forced_scores = torch.full_like(scores, lowest)
        forced_scores.scatter_(1, forced.clamp(min=0)[:, None], 0.0)
        return torch.where(rows[:, None], forced_scores, scores)


@dataclass
class TPOGenerateOutput(ModelOutput):
    r"""
    sequences (`torch.LongTensor` of shape `(batch, prompt + generated)`): as transformers returns them.
    task_outputs (`list[dict | None]`): per sample, the head predictions of its task queries (the slot
        tokens it generated or was given), in normalised units, or None for a sample without any:
        - `"region"`: `{"boxes": (q_i, 4)}` normalised (x0, y0, x1, y1) of the image the MLLM sees;
        - `"temporal"`: `{"windows": [q_i lists of (start, end, score)], "saliency": [(frames,)],
          "frame_times": [(frames,)]}`, normalised by the video duration;
        - `"mask"`: per query `"mask_logits"` (T, h, w), `"boxes"` (T, 4) normalised (x0, y0, x1, y1) of
          the thresholded masks (zeros where empty), `"visible"` (T,) bool and `"mode"` ("propagate": the
          first frame segmented, the others tracked through SAM2's video memory at SAM2's input size;
          "per_frame": every frame prompted by the task embedding, at SAM2's mask size S / 4).
        The processor's `post_process_*` methods turn them into pixels, seconds and RLE masks.
    head_outputs (`TPOOutput`, *optional*): the raw forward output of the heads' pass.
    scores, logits, attentions, hidden_states, cache: transformers' generation outputs.
    """

    sequences: torch.LongTensor | None = None
    task_outputs: list | None = None
    head_outputs: object | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: object | None = None

    past_key_values = past_key_values_alias


def right_align(tensor: torch.Tensor, shift: torch.Tensor, fill) -> torch.Tensor:
    """Move each row of a left-padded (batch, seq, ...) tensor left by `shift[row]` positions,
    filling the freed end with `fill` (left padding -> right padding)."""
    seq_len = tensor.shape[1]
    positions = torch.arange(seq_len, device=tensor.device)[None, :] + shift[:, None]  # (batch, seq)
    valid = positions < seq_len
    gather_index = positions.clamp(max=seq_len - 1)
    while gather_index.dim() < tensor.dim():
        gather_index = gather_index.unsqueeze(-1)
        valid = valid.unsqueeze(-1)
    gathered = torch.gather(tensor, 1, gather_index.expand_as(tensor))
    return torch.where(valid, gathered, torch.as_tensor(fill, dtype=tensor.dtype, device=tensor.device))


def generated_attention_mask(new_tokens: torch.Tensor, eos_token_ids: list[int], pad_token_id: int | None) -> torch.Tensor:
    """1 for generated tokens up to and including the first end-of-sequence token, 0 after it."""
    if not eos_token_ids:
        return torch.ones_like(new_tokens)
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for token in eos_token_ids:
        is_eos |= new_tokens == token
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~ended_before).long()


def append_to_left_padded(tensor: torch.Tensor, suffixes: list[torch.Tensor], fill) -> torch.Tensor:
    """Append `suffixes[row]` ((n_row, ...) each) to the rows of a left-padded (batch, seq, ...) tensor,
    keeping it left-padded: row i gains `max(n) - n_i` `fill` positions at its start.
    Returns (batch, seq + max(n), ...)."""
    width = max(suffix.shape[0] for suffix in suffixes)
    rows = []
    for row, suffix in zip(tensor, suffixes):
        pad = torch.full((width - suffix.shape[0], *row.shape[1:]), fill, dtype=row.dtype, device=row.device)
        rows.append(torch.cat([pad, row, suffix.to(device=row.device, dtype=row.dtype)]))
    return torch.stack(rows)


def incomplete_slot_runs(tokens: torch.Tensor, slot_ids: list[int]) -> torch.Tensor:
    """(batch, seq) bool: slot tokens that are not part of a complete run `slot_ids` (in order), as left
    at the end of an answer cut by `max_new_tokens` between two slot tokens."""
    k = len(slot_ids)
    is_slot = torch.isin(tokens, torch.tensor(slot_ids, device=tokens.device))
    if k == 1:
        return torch.zeros_like(is_slot)
    seq_len = tokens.shape[1]
    complete_start = torch.ones_like(is_slot)  # a complete run starts here
    for offset, slot in enumerate(slot_ids):
        shifted = torch.full_like(tokens, -1)
        shifted[:, : seq_len - offset] = tokens[:, offset:]
        complete_start &= shifted == slot
    covered = torch.zeros_like(is_slot)
    for offset in range(k):
        covered[:, offset:] |= complete_start[:, : seq_len - offset]
    return is_slot & ~covered


def check_normalised_box(box: torch.Tensor, where: str) -> None:
    """Refuse a tracking box that is not (x0, y0, x1, y1) inside the frame, normalised to [0, 1]."""
    values = box.detach().float().reshape(-1)
    tolerance = NORMALISED_TOLERANCE
    if values.numel() != 4 or not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: the initial box {values.tolist()} must be 4 finite numbers (x0, y0, x1, y1).")
    x0, y0, x1, y1 = values.tolist()
    inside = min(values.tolist()) >= -tolerance and max(values.tolist()) <= 1 + tolerance
    if not (inside and x0 < x1 and y0 < y1):
        raise ValueError(
            f"{where}: the initial box {values.tolist()} is outside the frame or empty. Tracking boxes are "
            "(x0, y0, x1, y1) normalised to [0, 1] of the frame with x0 < x1 and y0 < y1: divide a pixel box "
            "by the frame's (width, height, width, height)."
        )


MASK_VIDEO_MODES = ("propagate", "per_frame")
_ONE_SEQUENCE_PER_PROMPT = (
    "Task heads run on one sequence per prompt; with num_return_sequences > 1 pass run_task_heads=False."
)


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


def _per_frame_masks(mask_logits: torch.Tensor, threshold: float = 0.0) -> dict:
    """(T, h, w) mask logits of one query -> its masks entry: logits, normalised (T, 4) boxes of the
    thresholded masks (zeros where empty), visibility (T,)."""
    binary = mask_logits > threshold
    height, width = mask_logits.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=mask_logits.device)
    return {"mask_logits": mask_logits, "boxes": masks_to_boxes(binary) / scale, "visible": binary.flatten(1).any(1),
            "mode": "per_frame"}


class TPOGenerationMixin:
    """`generate` with the task heads, mask tracking and the per-sample task outputs, for
    [`TPOForConditionalGeneration`] (which provides `mllm`, the heads, `config` and `_locate_task_queries`)."""

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
        head_inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in HEAD_ONLY_INPUTS or k.startswith(DENSE_PREFIX)}
        task_labels = kwargs.get("task_labels")  # the collator's: which samples carry SAM2 frames
        for key in TRAINING_TARGETS:
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
                    fill = PER_TOKEN_FILL.get(key, 0)
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
            for key in SAM2_IMAGE_INPUTS:  # no mask query: no SAM2 image
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
            if (key not in NOT_PER_TOKEN and not key.startswith(DENSE_PREFIX) and isinstance(value, torch.Tensor)
                    and value.dim() >= 2
                    and tuple(value.shape[:2]) == (batch, prompt_len)):
                fill = PER_TOKEN_FILL.get(key, 0)
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
        per_image = {key: inputs.pop(key) for key in MASK_IMAGE_KEYS if inputs.get(key) is not None}
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

    def _task_outputs_per_sample(self, outputs: ModelOutput, batch: int, mask_results: list[dict] | None = None
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
