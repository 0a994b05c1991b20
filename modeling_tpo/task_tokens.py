"""Learnable task tokens and the task router."""

import torch
from torch import nn

from .configuration_tpo import ROUTER_CLASSES


class TaskTokens(nn.Module):
    """One learnable embedding per slot token of each enabled task.

    `embeddings[task]` has shape (num_task_tokens, hidden_size). Where a slot token id appears in
    the input, its input embedding is replaced by the matching row (see
    `TPOForConditionalGeneration._inject_task_tokens`).
    """

    def __init__(self, tasks: list[str], num_task_tokens: int, hidden_size: int):
        super().__init__()
        self.embeddings = nn.ParameterDict(
            {task: nn.Parameter(torch.zeros(num_task_tokens, hidden_size)) for task in tasks}
        )

    def stacked(self, tasks: list[str]) -> torch.Tensor:
        """(len(tasks) * num_task_tokens, hidden_size), tasks in the given order."""
        if len(tasks) == 1:
            return self.embeddings[tasks[0]]
        return torch.cat([self.embeddings[task] for task in tasks], dim=0)


class TaskRouter(nn.Module):
    """Classifies an instruction into text / temporal / region / mask.

    Input: (batch, hidden_size) hidden states at the end of the instruction.
    Output: (batch, 4) logits in the order of `ROUTER_CLASSES`; classes of disabled tasks get
    the dtype's lowest value so that softmax and argmax never pick them.
    """

    def __init__(self, hidden_size: int, enabled_tasks: list[str], router_hidden_size: int | None = None):
        super().__init__()
        if router_hidden_size:
            self.classifier = nn.Sequential(
                nn.Linear(hidden_size, router_hidden_size), nn.GELU(), nn.Linear(router_hidden_size, len(ROUTER_CLASSES))
            )
        else:
            self.classifier = nn.Linear(hidden_size, len(ROUTER_CLASSES))
        # A plain list, not a buffer: non-persistent buffers are not restored by from_pretrained.
        self.disabled_classes = [i for i, name in enumerate(ROUTER_CLASSES) if name != "text" and name not in enabled_tasks]
        self._disabled_masks = {}  # device -> (num_classes,) bool, made once per device

    def forward(self, instruction_hidden: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(instruction_hidden)
        if not self.disabled_classes:
            return logits
        disabled = self._disabled_masks.get(logits.device)
        if disabled is None:
            disabled = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            disabled[self.disabled_classes] = True
            self._disabled_masks[logits.device] = disabled
        return logits.masked_fill(disabled, torch.finfo(logits.dtype).min)
