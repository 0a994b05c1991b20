"""Region head: task embedding -> one normalised box per region query."""

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou


class RegionHead(nn.Module):
    """2-layer MLP (hidden -> hidden * hidden_ratio -> 4, ReLU) as in the public release.

    Input: task embeddings (num_queries, num_task_tokens, hidden_size), averaged over the task
    tokens. Output: boxes (num_queries, 4) as normalised (cx, cy, w, h) in (0, 1) (sigmoid).
    """

    def __init__(self, hidden_size: int, hidden_ratio: float = 0.5, l1_weight: float = 2.0, giou_weight: float = 0.2):
        super().__init__()
        inner = max(1, int(round(hidden_size * hidden_ratio)))
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(inner, 4)
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight

    def forward(self, task_embeddings: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(task_embeddings.mean(dim=1)))).sigmoid()

    def loss(self, pred_boxes_cxcywh: torch.Tensor, target_boxes_xyxy: torch.Tensor) -> dict[str, torch.Tensor]:
        """L1 on (cx, cy, w, h) summed over coordinates and GIoU loss on (x0, y0, x1, y1), both
        averaged over queries, computed in float32.

        Returns `{"region": weighted total, "region_l1": ..., "region_giou": ...}`.
        """
        pred = pred_boxes_cxcywh.float()
        target = target_boxes_xyxy.float()
        l1 = F.l1_loss(pred, box_xyxy_to_cxcywh(target), reduction="none").sum(-1).mean()
        giou = (1.0 - generalized_box_iou(box_cxcywh_to_xyxy(pred), target)).mean()
        total = self.l1_weight * l1 + self.giou_weight * giou
        return {"region": total, "region_l1": l1, "region_giou": giou}
