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

Cost. Every term is computed for all queries (and, for the DETR decoder, all decoder layers) at once:
per-query saliency rows and target windows are padded into (n, frames) / (n, windows) tensors with
masks, the decoder layers' predictions are stacked so the Hungarian matcher runs once (one copy of
the cost matrix to the host). The number of torch ops does not grow with the number of queries or
saliency levels, and no term reads a value back from the device.

Remote code: torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import generalized_temporal_iou, span_cw_to_se, span_se_to_cw
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


def span_normaliser(num_spans: torch.Tensor | float | None, local_spans: int,
                    device: torch.device) -> torch.Tensor | float:
    """The span losses' divisor, clamped to >= 1: `num_spans` when given, else `local_spans` (a Python
    number, so nothing is copied to the device) or, under torch.distributed, `mean_spans_per_process`."""
    if num_spans is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return mean_spans_per_process(local_spans, device).clamp(min=1.0)
        return max(float(local_spans), 1.0)
    if torch.is_tensor(num_spans):
        return num_spans.to(device=device, dtype=torch.float32).clamp(min=1.0)
    return max(float(num_spans), 1.0)


def pad_by_lengths(values: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(lengths), ...) rows, query by query -> (n, max length, ...) padded with zeros and (n, max length)
    bool, True on real rows. One scatter whose indices are built on the host and copied without waiting."""
    width = max(lengths, default=0)
    query = [q for q, length in enumerate(lengths) for _ in range(length)]
    slot = [j for length in lengths for j in range(length)]
    index = torch.tensor([query, slot], dtype=torch.long).to(values.device, non_blocking=True).unbind(0)
    padded = values.new_zeros((len(lengths), width, *values.shape[1:])).index_put_(index, values)
    true = torch.ones((), dtype=torch.bool, device=values.device)  # on the device: a host scalar would be copied
    mask = torch.zeros(len(lengths), width, dtype=torch.bool, device=values.device).index_put_(index, true)
    return padded, mask


def pack_spans(targets: list[dict], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per query (m_i, 2) float32 (start, end) on `device`, and all of them concatenated, (sum m_i, 2)."""
    spans = [target["spans"].to(device).float() for target in targets]
    return spans, (torch.cat(spans) if spans else torch.zeros(0, 2, device=device))


def pad_spans(all_spans: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum m_i, 2) windows, query by query -> (n, max m_i, 2) zero-padded and (n, max m_i) bool, True on
    real windows."""
    if len(set(lengths)) == 1:
        padded = all_spans.view(len(lengths), lengths[0], 2)
        return padded, torch.ones(padded.shape[:2], dtype=torch.bool, device=padded.device)
    return pad_by_lengths(all_spans, lengths)


def pack_saliency(targets: list[dict], num_frames: int,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-frame saliency targets of n queries as (n, L) float32, L <= num_frames (a row longer than
    the head's frames is cut), 0 where a query has no score; and (n, L) bool, True where it has one
    (None when every query has L scores). (None, None) when no query has saliency."""
    rows = [None if t.get("saliency") is None else t["saliency"].to(device).float() for t in targets]
    rows = [row if row is None or row.shape[0] <= num_frames else row[:num_frames] for row in rows]
    present = [row for row in rows if row is not None]
    if not present:
        return None, None
    lengths = [0 if row is None else row.shape[0] for row in rows]
    if len(present) == len(rows) and len(set(lengths)) == 1:
        return torch.stack(rows), None
    return pad_by_lengths(torch.cat(present), lengths)


def matched_indices(indices: list[tuple[torch.Tensor, torch.Tensor]], spans_per_query: list[int],
                    device: torch.device) -> torch.Tensor:
    """The matcher's pairs for R = layers * n rows (row r is query r % n) as one (3, matches) LongTensor on
    `device`: the row, the prediction in that row, and the target's index in the concatenated targets.
    Built on the host (the pairs are there) and copied once."""
    first_span = [sum(spans_per_query[:i]) for i in range(len(spans_per_query))]
    rows, predictions, targets = [], [], []
    for row, (src, tgt) in enumerate(indices):
        offset = first_span[row % len(spans_per_query)]
        rows += [row] * src.numel()
        predictions += src.tolist()
        targets += [offset + t for t in tgt.tolist()]
    return torch.tensor([rows, predictions, targets], dtype=torch.long).to(device, non_blocking=True)


# ---- saliency, all queries at once ---------------------------------------------------------------------
def saliency_rows(scores: torch.Tensor, frame_mask: torch.Tensor, saliency: torch.Tensor,
                  saliency_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What each query's saliency loss uses, for (n, F) scores and mask and (n, L) targets, L <= F:
    `valid` (n, L) where the frame is real, its score finite and a target given; `scores` (n, L) float32,
    0 elsewhere; `higher` (n, L, L) the valid pairs (i, j) with target_i > target_j; `num_pairs` (n,)
    their count; `active` (n,) the queries with such a pair, i.e. >= 2 valid frames whose targets are not
    all equal (the others carry no ranking signal and are left out)."""
    width = saliency.shape[1]
    if width < scores.shape[1]:
        scores, frame_mask = scores[:, :width], frame_mask[:, :width]
    valid = frame_mask & (scores.abs() < float("inf"))
    if saliency_mask is not None:
        valid = valid & saliency_mask
    higher = (saliency[:, :, None] > saliency[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    num_pairs = higher.sum((1, 2))
    return {"valid": valid, "scores": scores.masked_fill(~valid, 0.0), "targets": saliency, "higher": higher,
            "num_pairs": num_pairs, "active": num_pairs > 0}


def ranking_per_query(rows: dict[str, torch.Tensor], margin: float) -> torch.Tensor:
    """(n,) mean over valid frame pairs (i, j) with target_i > target_j of max(0, margin - (s_i - s_j))."""
    scores = rows["scores"]
    hinge = (margin - (scores[:, :, None] - scores[:, None, :])).clamp(min=0)  # (n, L, L)
    return (hinge * rows["higher"]).sum((1, 2)) / rows["num_pairs"].clamp(min=1)


def contrastive_per_query(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) mean over the distinct target levels above a query's lowest of -log(softmax mass, tau = 0.5,
    of the valid frames at or above that level). Frame j stands for the level of its target if it is
    the first valid frame with that value."""
    scores, targets, valid, higher = rows["scores"], rows["targets"], rows["valid"], rows["higher"]
    # inactive rows keep all (finite) frames so that nothing below turns into inf - inf
    outside = ~valid & rows["active"][:, None]
    log_probs = F.log_softmax((scores / CONTRASTIVE_TEMPERATURE).masked_fill(outside, float("-inf")), dim=1)
    width = targets.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=targets.device).tril(-1)  # [j, k]: k < j
    repeated = ((targets[:, :, None] == targets[:, None, :]) & valid[:, None, :] & earlier).any(-1)
    level = higher.any(-1) & ~repeated  # (n, L): valid, above the lowest valid target, first of its value
    # level j's positives: valid k with target_k >= target_j (invalid k are already -inf); a non-level j
    # sums every frame (finite, dropped)
    excluded = higher & level[:, :, None]  # (n, level j, frame k)
    log_mass = log_probs[:, None, :].masked_fill(excluded, float("-inf")).logsumexp(-1)  # (n, L)
    return -(log_mass * level).sum(1) / level.sum(1).clamp(min=1)


def bce_per_query(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) mean over valid frames of BCE(score, target clipped to [0, 1])."""
    invalid = ~rows["valid"]
    targets = rows["targets"].masked_fill(invalid, 0.0).clamp(0, 1)
    bce = F.binary_cross_entropy_with_logits(rows["scores"], targets, reduction="none")
    return bce.masked_fill(invalid, 0.0).sum(1) / rows["valid"].sum(1).clamp(min=1)


# ---- dense decoder's frame targets, all queries at once ----------------------------------------------
def dense_frame_targets(times: torch.Tensor, valid: torch.Tensor, spans: torch.Tensor,
                        span_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, F) frame times, (n, F) validity, (n, m, 2) windows with (n, m) mask -> (n, F) positive mask
    and (n, F, 2) target windows: a valid frame inside windows takes the shortest (the first of equals);
    a window containing no frame takes the valid frame nearest its centre (the last such window wins a
    shared frame)."""
    start, end = spans[..., 0][:, None, :], spans[..., 1][:, None, :]  # (n, 1, m)
    inside = (times[:, :, None] >= start) & (times[:, :, None] <= end) & valid[:, :, None] & span_mask[:, None, :]
    choice = torch.where(inside, end - start, float("inf")).argmin(-1)  # (n, F)
    positive = inside.any(-1)
    between_frames = span_mask & ~inside.any(1)  # (n, m)
    distance = (times[:, :, None] - spans.mean(-1)[:, None, :]).abs().masked_fill(~valid[:, :, None], float("inf"))
    nearest = distance.argmin(1)  # (n, m)
    window = torch.arange(spans.shape[1], device=spans.device).expand_as(nearest)
    taken_by = torch.full_like(choice, -1).scatter_reduce(1, nearest, torch.where(between_frames, window, -1), "amax")
    positive = positive | (taken_by >= 0)
    choice = torch.where(taken_by >= 0, taken_by, choice)
    return positive, spans.gather(1, choice[..., None].expand(-1, -1, 2))


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

    # ---- span and label terms (all decoder layers together) --------------------------------------------
    def layer_span_terms(self, layers: list[dict], spans: list[torch.Tensor], all_spans: torch.Tensor,
                         num_spans: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """`span_l1`, `span_giou` and `label`, each (layers,), of decoder layers whose `pred_spans` and
        `pred_logits` are (n, num_queries, 2); `spans` n (m_i, 2) targets, `all_spans` their concatenation.
        The layers are stacked into (layers * n) rows matched in one matcher call."""
        num_layers = len(layers)
        pred_spans = torch.stack([layer["pred_spans"] for layer in layers]).float().flatten(0, 1)  # (L*n, Q, 2) cw
        pred_logits = torch.stack([layer["pred_logits"] for layer in layers]).float().flatten(0, 1)
        indices = self.matcher(pred_spans, pred_logits, spans * num_layers)
        row, query, target = matched_indices(indices, [s.shape[0] for s in spans], pred_spans.device)
        true = torch.ones((), dtype=torch.bool, device=row.device)  # on the device: a host scalar would be copied
        matched = torch.zeros(pred_logits.shape[:2], dtype=torch.bool, device=row.device).index_put_((row, query), true)
        # every layer matches min(num_queries, m_i) windows of query i: the matches split evenly by layer
        if row.numel():
            matched_pred, matched_target = pred_spans[row, query], all_spans[target]  # (matches, 2) cw, se
            l1 = (matched_pred - span_se_to_cw(matched_target)).abs().view(num_layers, -1).sum(1) / num_spans
            giou = generalized_temporal_iou(span_cw_to_se(matched_pred), matched_target)
            giou_loss = (1 - giou).view(num_layers, -1).sum(1) / num_spans
        else:
            l1 = giou_loss = pred_spans.reshape(num_layers, -1).sum(1) * 0.0
        # label CE weighted 1 (matched: foreground, class 0) or eos_coef (no object, class 1), weighted mean per layer
        nll = F.cross_entropy(pred_logits.transpose(1, 2), (~matched).long(), reduction="none")  # (L*n, Q)
        weight = torch.where(matched, 1.0, self.eos_coef)
        label = (nll * weight).view(num_layers, -1).sum(1) / weight.view(num_layers, -1).sum(1)
        return {"span_l1": l1, "span_giou": giou_loss, "label": label}

    def span_terms(self, outputs: dict, targets: list[dict],
                   num_spans: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """`span_l1`, `span_giou` and `label` of one decoder layer's outputs (scalars)."""
        spans, all_spans = pack_spans(targets, outputs["pred_spans"].device)
        per_layer = self.layer_span_terms([outputs], spans, all_spans, num_spans)
        return {name: values[0] for name, values in per_layer.items()}

    # ---- saliency -----------------------------------------------------------------------------------
    def saliency_term(self, scores: torch.Tensor, frame_mask: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """scores (batch, frames) logits; targets[i]["saliency"] (frames,) >= 0 or None. The mean over the
        queries with a ranking signal (see `saliency_rows`), 0 when none has one."""
        scores = scores.float()
        saliency, saliency_mask = pack_saliency(targets, scores.shape[1], scores.device)
        if saliency is None or saliency.shape[1] < 2:
            return scores.sum() * 0.0
        rows = saliency_rows(scores, frame_mask, saliency, saliency_mask)
        if self.saliency_loss == "bce":
            per_query = bce_per_query(rows)
        else:
            per_query = ranking_per_query(rows, self.saliency_margin) + contrastive_per_query(rows)
        active = rows["active"]
        return (per_query * active).sum() / active.sum().clamp(min=1)  # per_query is finite everywhere

    # ---- everything ----------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: list[dict], num_spans: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        """Named terms and their weighted sum `temporal`.

        `num_spans` normalises the span losses. By default it is the number of GT spans here, or, when
        torch.distributed is initialised, their mean per process (all-reduced, as DETR does), so every
        process weighs a span alike; every process must then call this (a collective). The model
        computes `num_spans` itself (see `TPOForConditionalGeneration._temporal_outputs`) because
        processes without temporal samples never reach the head. Clamped to >= 1.
        """
        spans, all_spans = pack_spans(targets, outputs["pred_spans"].device)
        num_spans = span_normaliser(num_spans, all_spans.shape[0], all_spans.device)
        layers = [outputs, *(outputs.get("aux_outputs") or [])]
        per_layer = self.layer_span_terms(layers, spans, all_spans, num_spans)  # name -> (layers,)
        saliency = self.saliency_term(outputs["pred_saliency"], outputs["frame_mask"], targets)
        by_layer = {name: values.unbind(0) for name, values in per_layer.items()}
        terms = {f"temporal_{name}": values[0] for name, values in by_layer.items()}
        terms["temporal_saliency"] = saliency
        for layer in range(1, len(layers)):  # auxiliary layers, suffixed by their index
            terms.update({f"temporal_{name}_{layer - 1}": values[layer] for name, values in by_layer.items()})
        terms["temporal"] = sum((self.weights[name] * values.sum() for name, values in per_layer.items()),
                                self.weights["saliency"] * saliency)
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
        """(F,) frame times, (F,) validity, (m, 2) windows -> (F,) positive mask and (F, 2) target windows
        (one query of `dense_frame_targets`)."""
        span_mask = torch.ones(1, spans.shape[0], dtype=torch.bool, device=spans.device)
        positive, windows = dense_frame_targets(times[None], valid[None], spans[None], span_mask)
        return positive[0], windows[0]

    def forward(self, outputs: dict, targets: list[dict], num_spans=None) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"][..., 0].float()
        offsets = outputs["pred_offsets"].float()
        spans_cw = outputs["pred_spans"].float()
        times, frame_mask = outputs["frame_times"].float(), outputs["frame_mask"]
        spans, all_spans = pack_spans(targets, times.device)
        spans, span_mask = pad_spans(all_spans, [s.shape[0] for s in spans])  # (n, m, 2), (n, m)
        positive, windows = dense_frame_targets(times, frame_mask, spans, span_mask)  # (n, F), (n, F, 2)
        normaliser = positive.sum().float().clamp(min=1.0)
        bce = F.binary_cross_entropy_with_logits(logits, positive.float(), reduction="none")
        label = torch.where(frame_mask, bce, 0.0).sum() / frame_mask.sum()
        target_offsets = torch.stack([times - windows[..., 0], windows[..., 1] - times], -1).clamp(min=0)
        l1 = (F.l1_loss(offsets, target_offsets, reduction="none").sum(-1) * positive).sum() / normaliser
        giou = generalized_temporal_iou(span_cw_to_se(spans_cw), windows)  # (n, F)
        giou_loss = torch.where(positive, 1 - giou, 0.0).sum() / normaliser
        terms = {"temporal_span_l1": l1, "temporal_span_giou": giou_loss, "temporal_label": label,
                 "temporal_saliency": self.saliency_term(outputs["pred_saliency"], frame_mask, targets)}
        terms["temporal"] = sum(self.weights[k.removeprefix("temporal_")] * v for k, v in terms.items())
        return terms
