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
    task_outputs (`list[dict | None]`): per sample, the head predictions of the task tokens it generated
        (`{"region": {"boxes": (q, 4)}, "temporal": {...}, "mask": {...}}`, normalised as the model's
        forward returns them), or None for a sample that asked for no task.
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
