"""Region head: task embedding -> one normalised box per region query."""

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou


class RegionHead(nn.Module):
    """Task embedding -> one normalised box.

    mode "mlp" (the public release): a 2-layer MLP (hidden -> hidden * hidden_ratio -> 4, ReLU) on
        the task embedding alone; the LLM must carry the location into the slot token's hidden state.
    mode "heatmap": the task embedding scores each visual token (additive attention over the MLLM's
        last hidden states of the image tokens); the box centre is the soft-argmax of the scores over
        the tokens' patch centres and the size is regressed from the attended features and the
        scores' spread. A localisation prior that trains quickly when the MLLM learns from scratch
        (the embedded default); it needs `visual_token_xy` from the processor.

    Input: task embeddings (num_queries, num_task_tokens, hidden_size), averaged over the task tokens;
    for "heatmap" also visual features (q, V, hidden), their centres (q, V, 2) and mask (q, V).
    Output: boxes (num_queries, 4) as normalised (cx, cy, w, h) in (0, 1).
    """

    MODES = ("mlp", "heatmap")

    def __init__(self, hidden_size: int, mode: str = "mlp", hidden_ratio: float = 0.5, l1_weight: float = 2.0,
                 giou_weight: float = 0.2, heatmap_dim: int = 256):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Unknown region head mode {mode!r}; use one of {self.MODES}.")
        self.mode = mode
        if mode == "mlp":
            inner = max(1, int(round(hidden_size * hidden_ratio)))
            self.fc1 = nn.Linear(hidden_size, inner)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(inner, 4)
        else:
            self.key = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, heatmap_dim))
            self.query = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, heatmap_dim))
            self.score = nn.Sequential(nn.ReLU(), nn.Linear(heatmap_dim, 1))
            self.size = nn.Sequential(nn.Linear(2 * heatmap_dim + 2, heatmap_dim), nn.ReLU(), nn.Linear(heatmap_dim, 2))
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight

    @property
    def needs_visual_tokens(self) -> bool:
        return self.mode == "heatmap"

    def forward(self, task_embeddings: torch.Tensor, visual_features: torch.Tensor | None = None,
                visual_xy: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        query = task_embeddings.mean(dim=1)
        if self.mode == "mlp":
            return self.fc2(self.act(self.fc1(query))).sigmoid()
        if visual_features is None or visual_xy is None:
            raise ValueError("The 'heatmap' region head needs the visual tokens' features and centres.")
        dtype = self.key[1].weight.dtype
        keys = self.key(visual_features.to(dtype))  # (q, V, d)
        queries = self.query(query.to(dtype))  # (q, d)
        scores = self.score(keys + queries[:, None]).squeeze(-1)  # (q, V)
        if visual_mask is not None:
            scores = scores.masked_fill(~visual_mask.bool(), torch.finfo(scores.dtype).min)
        weights = scores.float().softmax(-1)
        xy = visual_xy.float()
        centre = (weights[..., None] * xy).sum(1)  # (q, 2)
        spread = (weights[..., None] * (xy - centre[:, None]).abs()).sum(1)
        attended = (weights[..., None].to(keys.dtype) * keys).sum(1)
        size = self.size(torch.cat([attended, queries, spread.to(keys.dtype)], -1)).sigmoid()
        return torch.cat([centre.to(size.dtype), size], -1)

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
