"""Criterion of the temporal head: matched span L1 and gIoU, foreground classification, saliency.

Saliency loss choice. The release (CG-DETR style) trains saliency with a margin ranking loss between
a more and a less salient clip, a rank-aware contrastive term, and a BCE on negative pairs. We keep
the two ranking terms as the default (`saliency_loss="ranking"`):
  - margin ranking: for every pair of valid frames (i, j) with target_i > target_j, hinge
    max(0, margin - (s_i - s_j)), averaged over such pairs;
  - rank-aware contrastive: for each saliency level r present in the targets, the frames at or above r
    are positives of an InfoNCE over all valid frames, temperature tau = 0.5.
Ranking only needs the ORDER of saliency targets, which is what annotators agree on (QVHighlights'
0-4 scores); the scores' absolute values stay free for the evaluator's rankings. `saliency_loss="bce"`
gives a plain per-frame BCE against targets clipped to [0, 1] (useful when targets are probabilities).
A sample whose targets are all equal (all zero) carries no ranking signal and contributes 0.
The release's negative-pair BCE is left out: it scores a video against another sample's query, and
here the query lives inside the LLM's sequence, so a negative pair would cost a second LLM forward.

Span normaliser: the number of GT spans, averaged over processes when torch.distributed is
initialised, clamped to >= 1 (`mean_spans_per_process`).

Remote code: torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import pairwise_generalized_temporal_iou, span_cw_to_se, span_se_to_cw
from .matcher import SpanHungarianMatcher

CONTRASTIVE_TEMPERATURE = 0.5


def mean_spans_per_process(local_spans: int, device: torch.device) -> torch.Tensor:
    """The number of GT spans of this process, averaged over processes when torch.distributed is
    initialised (a collective: every process must call it). Not clamped."""
    count = torch.tensor(float(local_spans), dtype=torch.float32, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count


class TemporalCriterion(nn.Module):
    """Named temporal losses on the final and auxiliary decoder outputs (DETR decoder)."""

    def __init__(self, matcher: SpanHungarianMatcher, span_l1_weight: float = 10.0, span_giou_weight: float = 1.0,
                 label_weight: float = 4.0, saliency_weight: float = 4.0, eos_coef: float = 0.1,
                 saliency_margin: float = 0.2, saliency_loss: str = "ranking"):
        super().__init__()
        if saliency_loss not in ("ranking", "bce"):
            raise ValueError(f"saliency_loss must be 'ranking' or 'bce', got {saliency_loss!r}.")
        self.matcher = matcher
        self.weights = {"span_l1": span_l1_weight, "span_giou": span_giou_weight, "label": label_weight,
                        "saliency": saliency_weight}
        self.eos_coef = eos_coef
        self.saliency_margin = saliency_margin
        self.saliency_loss = saliency_loss

    # ---- span and label terms (per decoder layer) --------------------------------------------------
    def span_terms(self, outputs: dict, targets: list[dict], num_spans: float) -> dict[str, torch.Tensor]:
        pred_spans, pred_logits = outputs["pred_spans"].float(), outputs["pred_logits"].float()
        target_spans = [t["spans"].to(pred_spans.device).float() for t in targets]
        indices = self.matcher(pred_spans, pred_logits, target_spans)
        batch_index = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(pred_spans.device)
        pred_index = torch.cat([src for src, _ in indices]).to(pred_spans.device)
        matched_pred = pred_spans[batch_index, pred_index]  # (matches, 2) cw
        matched_target = torch.cat([t[tgt.to(t.device)] for t, (_, tgt) in zip(target_spans, indices)])  # se
        if matched_pred.numel():
            l1 = F.l1_loss(matched_pred, span_se_to_cw(matched_target), reduction="none").sum() / num_spans
            giou = torch.diag(pairwise_generalized_temporal_iou(span_cw_to_se(matched_pred), matched_target))
            giou_loss = (1 - giou).sum() / num_spans
        else:
            l1 = giou_loss = pred_spans.sum() * 0.0
        classes = torch.ones(pred_logits.shape[:2], dtype=torch.long, device=pred_logits.device)  # 1 = no object
        classes[batch_index, pred_index] = 0
        class_weight = torch.tensor([1.0, self.eos_coef], device=pred_logits.device)
        label = F.cross_entropy(pred_logits.transpose(1, 2), classes, weight=class_weight)
        return {"span_l1": l1, "span_giou": giou_loss, "label": label}

    # ---- saliency -----------------------------------------------------------------------------------
    def saliency_term(self, scores: torch.Tensor, frame_mask: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """scores (batch, frames) logits; targets[i]["saliency"] (frames,) >= 0 or None."""
        scores = scores.float()
        losses = []
        for i, target in enumerate(targets):
            saliency = target.get("saliency")
            if saliency is None:
                continue
            n = min(scores.shape[1], saliency.shape[0])
            valid = frame_mask[i, :n] & torch.isfinite(scores[i, :n])
            s, y = scores[i, :n][valid], saliency.to(scores.device).float()[:n][valid]
            if y.numel() < 2 or bool((y.max() - y.min()) <= 0):
                continue
            if self.saliency_loss == "bce":
                losses.append(F.binary_cross_entropy_with_logits(s, y.clamp(0, 1)))
                continue
            higher = y[:, None] > y[None, :]  # (frames, frames): i more salient than j
            hinge = (self.saliency_margin - (s[:, None] - s[None, :])).clamp(min=0)
            ranking = hinge[higher].mean()
            contrastive = []
            log_probs = F.log_softmax(s / CONTRASTIVE_TEMPERATURE, dim=0)
            for level in torch.unique(y[y > y.min()]):
                positives = y >= level
                contrastive.append(-torch.logsumexp(log_probs[positives], dim=0))
            losses.append(ranking + torch.stack(contrastive).mean())
        if not losses:
            return scores.sum() * 0.0
        return torch.stack(losses).mean()

    # ---- everything ----------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: list[dict], num_spans: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        """Named terms and their weighted sum `temporal`.

        `num_spans` normalises the span losses. By default it is the number of GT spans here, or, when
        torch.distributed is initialised, their mean per process (all-reduced, as DETR does), so every
        process weighs a span alike; every process must then call this (a collective). The model
        computes `num_spans` itself (see `TPOForConditionalGeneration._temporal_outputs`) because
        processes without temporal samples never reach the head. Clamped to >= 1.
        """
        device = outputs["pred_spans"].device
        if num_spans is None:
            num_spans = mean_spans_per_process(sum(t["spans"].shape[0] for t in targets), device)
        num_spans = torch.as_tensor(num_spans, dtype=torch.float32, device=device).clamp(min=1.0)
        terms = {f"temporal_{k}": v for k, v in self.span_terms(outputs, targets, num_spans).items()}
        terms["temporal_saliency"] = self.saliency_term(outputs["pred_saliency"], outputs["frame_mask"], targets)
        total = sum(self.weights[k.removeprefix("temporal_")] * v for k, v in terms.items())
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            aux_terms = self.span_terms(aux, targets, num_spans)
            for name, value in aux_terms.items():
                terms[f"temporal_{name}_{i}"] = value
                total = total + self.weights[name] * value
        terms["temporal"] = total
        return terms


class DenseTemporalCriterion(TemporalCriterion):
    """Losses of the dense (frame-anchored) decoder: every frame inside a GT window is a positive whose
    target is that window (the shortest, if several contain it; a window containing no frame takes
    the frame nearest its centre):
      - `temporal_label`: BCE of each valid frame's foreground logit;
      - `temporal_span_l1`: L1 of the positives' distances to the window's start and end;
      - `temporal_span_giou`: 1 - gIoU of the positives' windows and their targets;
      - `temporal_saliency`: as for the DETR decoder.
    Span terms average over this process's positive frames. This converges in far fewer steps than set
    prediction, which a model trained from scratch on CPU needs.
    """

    def __init__(self, span_l1_weight: float = 10.0, span_giou_weight: float = 1.0, label_weight: float = 4.0,
                 saliency_weight: float = 4.0, saliency_margin: float = 0.2, saliency_loss: str = "ranking"):
        nn.Module.__init__(self)
        if saliency_loss not in ("ranking", "bce"):
            raise ValueError(f"saliency_loss must be 'ranking' or 'bce', got {saliency_loss!r}.")
        self.weights = {"span_l1": span_l1_weight, "span_giou": span_giou_weight, "label": label_weight,
                        "saliency": saliency_weight}
        self.saliency_margin = saliency_margin
        self.saliency_loss = saliency_loss

    @staticmethod
    def frame_targets(times: torch.Tensor, valid: torch.Tensor, spans: torch.Tensor):
        """(F,) frame times, (F,) validity, (m, 2) windows -> (F,) positive mask and (F, 2) target windows."""
        inside = (times[:, None] >= spans[None, :, 0]) & (times[:, None] <= spans[None, :, 1]) & valid[:, None]
        lengths = (spans[:, 1] - spans[:, 0])[None, :].expand_as(inside)
        choice = torch.where(inside, lengths, torch.full_like(lengths, float("inf"))).argmin(1)
        positive = inside.any(1)
        for j in range(spans.shape[0]):  # a window between frames takes the frame nearest its centre
            if not bool(inside[:, j].any()):
                distance = (times - spans[j].mean()).abs().masked_fill(~valid, float("inf"))
                nearest = int(distance.argmin())
                positive[nearest] = True
                choice[nearest] = j
        return positive, spans[choice]

    def forward(self, outputs: dict, targets: list[dict], num_spans=None) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"][..., 0].float()
        offsets = outputs["pred_offsets"].float()
        spans_cw = outputs["pred_spans"].float()
        times, frame_mask = outputs["frame_times"].float(), outputs["frame_mask"]
        positives, target_windows = [], []
        for i, target in enumerate(targets):
            positive, windows = self.frame_targets(times[i], frame_mask[i], target["spans"].to(times.device).float())
            positives.append(positive)
            target_windows.append(windows)
        positive = torch.stack(positives)  # (n, F)
        windows = torch.stack(target_windows)  # (n, F, 2)
        normaliser = positive.sum().float().clamp(min=1.0)
        label = F.binary_cross_entropy_with_logits(logits[frame_mask], positive[frame_mask].float())
        target_offsets = torch.stack([times - windows[..., 0], windows[..., 1] - times], -1).clamp(min=0)
        l1 = (F.l1_loss(offsets, target_offsets, reduction="none").sum(-1) * positive).sum() / normaliser
        pred_se = span_cw_to_se(spans_cw)[positive]
        if pred_se.numel():
            giou = torch.diag(pairwise_generalized_temporal_iou(pred_se, windows[positive]))
            giou_loss = (1 - giou).sum() / normaliser
        else:
            giou_loss = spans_cw.sum() * 0.0
        terms = {"temporal_span_l1": l1, "temporal_span_giou": giou_loss, "temporal_label": label,
                 "temporal_saliency": self.saliency_term(outputs["pred_saliency"], frame_mask, targets)}
        terms["temporal"] = sum(self.weights[k.removeprefix("temporal_")] * v for k, v in terms.items())
        return terms
