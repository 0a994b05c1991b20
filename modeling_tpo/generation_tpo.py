"""Generation with task tokens: slot forcing during decoding, and the re-layout used to run the heads
on the generated sequences.

Remote code: torch and transformers only.
"""

from dataclasses import dataclass

import torch
from transformers.generation import LogitsProcessor
from transformers.modeling_outputs import ModelOutput


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

    @property
    def past_key_values(self):
        """The KV cache under its name before transformers 5.24 (`cache` since)."""
        return self.cache


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
    tolerance = 1e-4
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
