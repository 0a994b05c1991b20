"""Region head: task embedding -> one normalised box per region query."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, l1_and_giou_losses
from .configuration_tpo import RegionHeadConfig



@dataclass
class RegionHeadOutput(ModelOutput):
    r"""
    The region predictions of a forward pass's region queries.

    pred_boxes (`torch.FloatTensor` of shape `(num_region_queries, 4)`): normalised (x0, y0, x1, y1) boxes,
        clamped to [0, 1], queries in (sample, position) order.
    batch_index (`torch.LongTensor` of shape `(num_region_queries,)`): the sample of each box.
    """

    pred_boxes: torch.FloatTensor | None = None
    batch_index: torch.LongTensor | None = None


class RegionHead(nn.Module):
    """Task embedding -> one normalised box.

    mode "mlp" (the public release): a 2-layer MLP (hidden -> hidden * hidden_ratio -> 4, ReLU) on
        the task embedding alone; the LLM must carry the location into the slot token's hidden state.
    mode "heatmap": the task embedding scores each visual token (additive attention over the MLLM's
        last hidden states of the image tokens); the box centre is the soft-argmax of the scores over
        the tokens' patch centres and the size is regressed from the attended features and the
        scores' spread. A localisation prior that trains quickly when the MLLM learns from scratch
        (the embedded default); it needs `visual_token_xy` from the processor. `heatmap_score`: "additive" or
        "additive_dot" (plus the scaled dot product of the same key and query projections); `query_text`: the
        instruction's text tokens, attention-pooled, join the task embedding in the query.

    What the "mlp" mode regresses (`box_format`): "cxcywh_sigmoid" (ours: a sigmoid on (cx, cy, w, h), always a
    valid box inside the image) or "xyxy_raw" (the release: (x0, y0, x1, y1) straight from the last linear layer).
    The L1 term (`l1_reduction`): "coordinate_sum" (ours: summed over the 4 coordinates, averaged over boxes) or
    "mean" (the release: averaged over the N x 4 coordinates); it is taken in the regressed format.

    Input: task embeddings (num_queries, num_task_tokens, hidden_size), averaged over the task tokens;
    for "heatmap" also visual features (q, V, hidden), their centres (q, V, 2) and mask (q, V).
    Output: boxes (num_queries, 4) as normalised (cx, cy, w, h) (in (0, 1) but for "xyxy_raw").

    Args:
        hidden_size: the LLM's hidden size.
        config: the settings (`RegionHeadConfig`, or a dict of its fields; None: the defaults), kept as `settings`.
        **settings: `RegionHeadConfig` fields set over `config` (`RegionHead(64, mode="heatmap")`).
    """

    MODES = ("mlp", "heatmap")
    HEATMAP_SCORES = ("additive", "additive_dot")
    BOX_FORMATS = ("cxcywh_sigmoid", "xyxy_raw")
    L1_REDUCTIONS = ("coordinate_sum", "mean")

    def __init__(self, hidden_size: int, config: RegionHeadConfig | dict | None = None, **settings):
        super().__init__()
        s = self.settings = RegionHeadConfig.build(config, **settings)
        if s.heatmap_score not in self.HEATMAP_SCORES:
            raise ValueError(f"Unknown region head heatmap_score {s.heatmap_score!r}; use one of "
                             f"{self.HEATMAP_SCORES}.")
        if s.mode not in self.MODES:
            raise ValueError(f"Unknown region head mode {s.mode!r}; use one of {self.MODES}.")
        if s.box_format not in self.BOX_FORMATS:
            raise ValueError(f"Unknown region head box_format {s.box_format!r}; use one of {self.BOX_FORMATS}.")
        if s.mode == "heatmap" and s.box_format != "cxcywh_sigmoid":
            raise ValueError("region head box_format 'xyxy_raw' is the released MLP's: use it with mode 'mlp' (the "
                             "'heatmap' mode predicts bounded (cx, cy, w, h)).")
        if s.l1_reduction not in self.L1_REDUCTIONS:
            raise ValueError(f"Unknown region head l1_reduction {s.l1_reduction!r}; use one of {self.L1_REDUCTIONS}.")
        self.mode = s.mode
        self.heatmap_score = s.heatmap_score
        self.query_text = s.query_text and s.mode == "heatmap"  # the MLP reads the task embedding alone
        self.box_format = s.box_format
        self.l1_reduction = s.l1_reduction
        if s.mode == "mlp":
            inner = max(1, int(round(hidden_size * s.hidden_ratio)))
            self.fc1 = nn.Linear(hidden_size, inner)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(inner, 4)
        else:
            self.key = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, s.heatmap_dim))
            self.query = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, s.heatmap_dim))
            self.score = nn.Sequential(nn.ReLU(), nn.Linear(s.heatmap_dim, 1))
            # per token: centre offset from its patch centre (tanh-bounded) and box size, both query-aware
            self.token_box = nn.Sequential(nn.ReLU(), nn.Linear(s.heatmap_dim, 4))
            if self.query_text:  # the instruction's words, attention-pooled, join the task embedding in the query
                self.text_score = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 1))
                self.text_query = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, s.heatmap_dim))
        self.heatmap_weight = s.heatmap_weight
        self.l1_weight = s.l1_weight
        self.giou_weight = s.giou_weight

    @property
    def needs_visual_tokens(self) -> bool:
        return self.mode == "heatmap"

    def forward(self, task_embeddings: torch.Tensor, visual_features: torch.Tensor | None = None,
                visual_xy: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(q, k, hidden) task embeddings (+ visual tokens for "heatmap") -> (q, 4) normalised (cx, cy, w, h)."""
        return self.forward_with_heatmap(task_embeddings, visual_features, visual_xy, visual_mask)[0]

    def forward_with_heatmap(self, task_embeddings: torch.Tensor, visual_features: torch.Tensor | None = None,
                             visual_xy: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None,
                             query_features: torch.Tensor | None = None, query_mask: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Boxes (q, 4) normalised (cx, cy, w, h) and, for "heatmap", the visual tokens' scores (q, V)
        (masked tokens at the dtype's minimum; None for "mlp"). With `query_text`, `query_features` (q, Q, hidden)
        and `query_mask` (q, Q) are the instruction's text tokens (without them the task embedding alone asks)."""
        query = task_embeddings.mean(dim=1)
        if self.mode == "mlp":
            raw = self.fc2(self.act(self.fc1(query)))
            return (raw.sigmoid() if self.box_format == "cxcywh_sigmoid" else box_xyxy_to_cxcywh(raw)), None
        if visual_features is None or visual_xy is None:
            raise ValueError("The 'heatmap' region head needs the visual tokens' features and centres.")
        dtype = next(self.key.parameters()).dtype
        keys, queries = self.key(visual_features.to(dtype)), self.query(query.to(dtype))[:, None]  # (q, V|1, d)
        if self.query_text and query_features is not None:
            queries = queries + self._text_query(query_features.to(dtype), query_mask)[:, None]
        joint = keys + queries  # (q, V, d)
        scores = self.score(joint).squeeze(-1)  # (q, V)
        if self.heatmap_score == "additive_dot":
            # a scaled dot product on the same projections: matching a query attribute (a colour word) to a
            # token's is one multiplication instead of something the ReLU layer must approximate
            scores = scores + (keys * queries).sum(-1) / keys.shape[-1] ** 0.5
        if visual_mask is not None:
            scores = scores.masked_fill(~visual_mask.bool(), torch.finfo(scores.dtype).min)
        weights = scores.float().softmax(-1)[..., None]  # (q, V, 1)
        token_box = self.token_box(joint).float()  # (q, V, 4)
        centres = visual_xy.float() + TOKEN_OFFSET_RANGE * token_box[..., :2].tanh()
        centre = (weights * centres).sum(1)  # (q, 2)
        size = (weights * token_box[..., 2:]).sum(1).sigmoid()
        return torch.cat([centre, size], -1).clamp(0.0, 1.0).to(dtype), scores

    def _text_query(self, query_features: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
        """(q, Q, hidden) text tokens -> (q, heatmap_dim): their attention-pooled projection (zero for a query
        without text tokens). A word that names the object (a colour) reaches the scores in one pooling step,
        without waiting for the LLM to learn to move it into the task token."""
        valid = (torch.ones(query_features.shape[:2], dtype=torch.bool, device=query_features.device)
                 if query_mask is None else query_mask.bool())
        scores = self.text_score(query_features).squeeze(-1).float()
        # (q, Q); a finite fill keeps a row without valid tokens finite (uniform), zeroed below, gradients too
        weights = scores.masked_fill(~valid, torch.finfo(scores.dtype).min).softmax(-1)
        pooled = (weights.to(query_features.dtype)[..., None] * query_features).sum(1)
        return self.text_query(pooled) * valid.any(-1, keepdim=True).to(pooled.dtype)

    def loss(self, pred_boxes_cxcywh: torch.Tensor, target_boxes_xyxy: torch.Tensor,
             token_scores: torch.Tensor | None = None, visual_xy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L1 (on (cx, cy, w, h), or on (x0, y0, x1, y1) for "xyxy_raw"; reduced by `l1_reduction`) and GIoU loss on
        (x0, y0, x1, y1) averaged over queries, computed in float32; for "heatmap" with `token_scores` (q, V) and
        `visual_xy` (q, V, 2) also `region_heatmap`: the KL divergence from a Gaussian at the GT centre (standard
        deviations a quarter of the GT width and height) over the tokens to the tokens' softmax, which supervises
        *where* to look directly instead of only through the box (0 when the two agree).

        Returns `{"region": weighted total, "region_l1": ..., "region_giou": ..., ["region_heatmap": ...]}`.
        """
        target = target_boxes_xyxy.float()
        if self.box_format == "xyxy_raw":
            pred_xyxy = box_cxcywh_to_xyxy(pred_boxes_cxcywh.float())
            l1 = (pred_xyxy - target).abs().sum(-1).mean()
            giou = (1.0 - generalized_box_iou(pred_xyxy, target)).mean()
        else:
            l1, giou = l1_and_giou_losses(pred_boxes_cxcywh.float(), target)
        if self.l1_reduction == "mean":
            l1 = l1 / 4  # the sum over 4 coordinates, averaged over boxes -> the mean over N x 4
        terms = {"region_l1": l1, "region_giou": giou}
        total = self.l1_weight * l1 + self.giou_weight * giou
        if token_scores is not None and visual_xy is not None and self.heatmap_weight:
            terms["region_heatmap"] = heatmap_kl_divergence(token_scores, visual_xy, target)
            total = total + self.heatmap_weight * terms["region_heatmap"]
        return {"region": total, **terms}


TOKEN_OFFSET_RANGE = 0.25  # a token's predicted centre lies within +-0.25 (normalised) of its patch centre


def heatmap_kl_divergence(token_scores: torch.Tensor, visual_xy: torch.Tensor, target_xyxy: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax(token_scores)), (q, V) scores, the target a Gaussian at each
    target box's centre with standard deviations (w / 4, h / 4) over the tokens' centres `visual_xy` (q, V, 2);
    masked tokens (scores at the dtype's minimum) get no target mass."""
    target = box_xyxy_to_cxcywh(target_xyxy.float())
    sigma = (target[:, None, 2:] / 4).clamp(min=1e-3)  # (q, 1, 2)
    distance = ((visual_xy.float() - target[:, None, :2]) / sigma).pow(2).sum(-1)  # (q, V)
    valid = token_scores > torch.finfo(token_scores.dtype).min
    log_target = (-0.5 * distance).masked_fill(~valid, float("-inf")).log_softmax(-1)
    log_pred = token_scores.float().masked_fill(~valid, float("-inf")).log_softmax(-1)
    terms = log_target.exp() * (log_target - log_pred)
    return terms.masked_fill(~valid, 0.0).sum(-1).mean()
