"""Hungarian matching of predicted moments to ground-truth windows (1-D, DETR-style).

Remote code: torch only at module level; scipy is imported where the assignment is solved.
"""

import torch
from torch import nn

from .box_ops import generalized_temporal_iou, span_cw_to_se

UNMATCHABLE_COST = 1e6  # stands for a non-finite cost, far above any finite one (span L1 <= 2, gIoU and p in [-1, 1])


class SpanHungarianMatcher(nn.Module):
    """One-to-one assignment between the `num_queries` predicted moments of each sample and its GT
    windows, minimising

        cost = cost_span * L1(center/width) - cost_giou * gIoU(start/end) - cost_class * p(foreground).

    The temporal criterion matches all decoder layers in one call (batch = layers * queries); the cost
    matrix is copied to the host once and `linear_sum_assignment` runs per sample.

    Args:
        cost_span, cost_giou, cost_class: weights of the three costs.
    """

    def __init__(self, cost_span: float = 10.0, cost_giou: float = 1.0, cost_class: float = 4.0):
        super().__init__()
        if cost_span == 0 and cost_giou == 0 and cost_class == 0:
            raise ValueError("At least one matching cost must be non-zero.")
        self.cost_span = cost_span
        self.cost_giou = cost_giou
        self.cost_class = cost_class

    @torch.no_grad()
    def forward(self, pred_spans: torch.Tensor, pred_logits: torch.Tensor, target_spans: list[torch.Tensor]):
        """
        Args:
            pred_spans: (batch, num_queries, 2) normalised (center, width).
            pred_logits: (batch, num_queries, 2) logits, index 0 = foreground, 1 = no object.
            target_spans: `batch` tensors of shape (num_targets_i, 2), normalised (start, end).
        Returns:
            `batch` pairs (pred_index, target_index) of LongTensors of equal length
            min(num_queries, num_targets_i); empty targets give empty tensors.
        """
        from scipy.optimize import linear_sum_assignment

        batch, num_queries = pred_spans.shape[:2]
        sizes = [t.shape[0] for t in target_spans]
        empty = torch.empty(0, dtype=torch.long)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(batch)]
        spans = pred_spans.flatten(0, 1).float()  # (batch * queries, 2) cw
        foreground = pred_logits.flatten(0, 1).float().softmax(-1)[:, 0]
        targets_se = torch.cat(target_spans).to(spans.device).float()  # (total_targets, 2)
        targets_cw = torch.stack([(targets_se[:, 0] + targets_se[:, 1]) / 2, targets_se[:, 1] - targets_se[:, 0]], -1)
        cost = (
            self.cost_span * torch.cdist(spans, targets_cw, p=1)
            - self.cost_giou * generalized_temporal_iou(span_cw_to_se(spans)[:, None], targets_se[None])
            - self.cost_class * foreground[:, None]
        )
        # Non-finite predictions (NaN activations, NaN frame times) would stop scipy with "matrix contains invalid
        # numeric entries"; any assignment will do for them, since their loss is non-finite too and the trainer
        # then stops with the step, the term and the sample ids (NonFiniteLossError).
        cost = torch.nan_to_num(cost, nan=UNMATCHABLE_COST, posinf=UNMATCHABLE_COST, neginf=-UNMATCHABLE_COST)
        cost = cost.view(batch, num_queries, -1).cpu().numpy()  # the one copy to the host
        indices, first = [], 0
        for i, size in enumerate(sizes):
            if size == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(cost[i, :, first : first + size])
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
            first += size
        return indices
