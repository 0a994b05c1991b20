"""Criteria of the temporal head: matched span L1 and gIoU, foreground classification and saliency, for the
DETR decoder (`TemporalCriterion`) and the dense decoder (`DenseTemporalCriterion`), which both hold a
`SaliencyCriterion`. The terms and their differences from the release: README.md, "The model" and "The release
preset and every difference from the paper and the release".

Remote code: torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import generalized_temporal_iou, span_cw_to_se, span_se_to_cw
from .matcher import SpanHungarianMatcher

CONTRASTIVE_TEMPERATURE = 0.5
SALIENCY_LOSSES = ("ranking", "bce", "release")
SPAN_L1_REDUCTIONS = ("coordinate_sum", "mean")
LABEL_REDUCTIONS = ("weight_normalised", "mean")
# The release's saliency labels are the sums of three annotators' 0-4 scores (QVHighlights): 0..12. Our targets are
# the mean score / 4, i.e. that sum / 12; its rank-contrastive levels are 1..11.
RELEASE_SALIENCY_SCALE = 12


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


def release_ranking_per_query(rows: dict[str, torch.Tensor], margin: float) -> torch.Tensor:
    """(n,) the release's margin ranking in expectation over its random pairs (see the module docstring):
    graded targets: hinge(hard pair) + mean hinge(relevant, irrelevant); binary targets: 2 x mean hinge(inside,
    outside); hinge(pos, neg) = max(0, margin + s_neg - s_pos). Without an irrelevant clip the release pairs a clip
    with itself (hinge = margin). 0 for a query without a relevant clip."""
    scores, targets, valid = rows["scores"], rows["targets"], rows["valid"]
    relevant, other = valid & (targets > 0), valid & (targets <= 0)
    hinge = (margin + scores[:, None, :] - scores[:, :, None]).clamp(min=0)  # [i, j]: pos i, neg j
    pairs = relevant[:, :, None] & other[:, None, :]
    has_pairs = pairs.any((1, 2))
    easy = (hinge * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    highest = targets.masked_fill(~relevant, float("-inf")).argmax(1, keepdim=True)  # the first of equals
    lowest = targets.masked_fill(~relevant, float("inf")).argmin(1, keepdim=True)
    hard = (margin + scores.gather(1, lowest) - scores.gather(1, highest)).clamp(min=0)[:, 0]
    binary = ((targets == 0) | (targets == 1) | ~valid).all(1)
    graded = hard + torch.where(has_pairs, easy, hard)
    windows_only = 2 * torch.where(has_pairs, easy, torch.full_like(easy, margin))
    return torch.where(relevant.any(1), torch.where(binary, windows_only, graded), torch.zeros_like(easy))


def release_contrastive_per_query(rows: dict[str, torch.Tensor], negative_scores: torch.Tensor | None = None,
                                  negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) the release's rank-contrastive term: sum over levels r = 1..11 of -mean over the clips with label >= r
    (label = target x 12, rounded) of their log-softmax (tau = 0.5) over the video's clips, and over the negative
    pair's clips where `negative_mask` (n,) says the query has one; / 12. 0 at levels without a positive."""
    scores, valid = rows["scores"], rows["valid"]
    labels = (rows["targets"] * RELEASE_SALIENCY_SCALE).round()
    logits = (scores / CONTRASTIVE_TEMPERATURE).masked_fill(~valid, float("-inf"))
    everything = logits
    if negative_scores is not None and negative_mask is not None:
        extra = (negative_scores / CONTRASTIVE_TEMPERATURE).masked_fill(~(valid & negative_mask[:, None]), float("-inf"))
        everything = torch.cat([logits, extra], 1)
    log_prob = logits - everything.logsumexp(1, keepdim=True)  # (n, L), -inf where invalid
    levels = torch.arange(1, RELEASE_SALIENCY_SCALE, device=scores.device, dtype=labels.dtype)
    positive = (labels[:, None, :] >= levels[None, :, None]) & valid[:, None, :]  # (n, 11, L)
    total = log_prob[:, None, :].masked_fill(~positive, 0.0).sum(-1)
    per_level = -total / positive.sum(-1).clamp(min=1)
    return per_level.sum(1) / RELEASE_SALIENCY_SCALE


def negative_pair_per_query(negative_scores: torch.Tensor, valid: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """(n,) sum over a video's clips of -log(1 - p) for its pairing with another query: p = sigmoid(score), or the
    score itself for `probabilities` (text-to-video relevance in [0, 1])."""
    if probabilities:
        terms = -torch.log1p(-negative_scores.clamp(max=1 - 1e-6))
    else:
        terms = F.softplus(negative_scores)  # -log(1 - sigmoid(s))
    return terms.masked_fill(~valid, 0.0).sum(1)


def binary_relevance_bce_per_query(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) mean over valid clips of BCE(relevance, target > 0) (relevance a probability)."""
    invalid = ~rows["valid"]
    probabilities = rows["scores"].clamp(1e-6, 1 - 1e-6)
    bce = F.binary_cross_entropy(probabilities, (rows["targets"] > 0).float(), reduction="none")
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


class SaliencyCriterion:
    """The saliency terms of both temporal criteria: `temporal_saliency` and, with dummy tokens,
    `temporal_t2v_saliency`, and their weighted sum.

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

    `saliency_loss="release"`: the release's (CG-DETR's) terms, as `release_*` below compute them, averaged over the
    queries with saliency targets:
      - margin ranking (margin 0.2) on clip pairs: with graded targets, the hard pair (the highest- against the
        lowest-scored relevant clip) plus a relevant against an irrelevant clip, with binary targets (windows only)
        twice a clip inside against one outside. The release draws the random pairs in its data loader; here their
        expectation is taken (the mean over all such pairs), so the numbers are the release's in expectation;
      - rank-contrastive (tau = 0.5) over the levels 1..11 of the summed three-annotator scores (0-12; our targets
        are that / 12): at level r the clips >= r are positives, -mean of their log-softmax over the video's clips
        (and the negative pair's, which are never positives), each row's terms summed over levels / 12;
      - negative-pair BCE: every clip of a video paired with another sample's query is pushed to 0,
        sum over clips of -log(1 - sigmoid(score)).
    The release averages the rank-contrastive term separately over the queries with and without a negative partner
    and adds the two means; here every query counts once in one mean (the same when all or none have a partner).
    Negative pairs (`negative_pairs`) roll the query text within the batch at the head (the LLM runs once).

    With CG-DETR's dummy tokens the head also returns each frame's text-to-video relevance (the attention mass on
    the real text against the dummies, in [0, 1]); `temporal_t2v_saliency` supervises it with the same family of terms
    ("release": margin ranking, rank-contrastive, negative-pair -log(1 - relevance), and a BCE of the relevance
    against the binarised targets), weighted by `t2v_saliency_weight` inside the saliency weight, as CG-DETR does.
    """

    def __init__(self, saliency_weight: float = 4.0, saliency_margin: float = 0.2, saliency_loss: str = "ranking",
                 t2v_saliency_weight: float = 1.0):
        if saliency_loss not in SALIENCY_LOSSES:
            raise ValueError(f"saliency_loss must be one of {SALIENCY_LOSSES}, got {saliency_loss!r}.")
        self.weight = saliency_weight
        self.margin = saliency_margin
        self.loss = saliency_loss
        self.t2v_weight = t2v_saliency_weight

    def term(self, scores: torch.Tensor, frame_mask: torch.Tensor, targets: list[dict],
             negative_scores: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None,
             probabilities: bool = False) -> torch.Tensor:
        """scores (batch, frames) logits (or, with `probabilities`, text-to-video relevance in [0, 1]); targets[i]
        ["saliency"] (frames,) >= 0 or None; negative_scores (batch, frames) of each video with another query and
        negative_mask (batch,) which queries have one (negative pairs). Ours ("ranking", "bce"): the mean over the
        queries with a ranking signal (see `saliency_rows`), plus the negative-pair term; "release": the release's
        terms averaged over the queries with saliency targets. 0 when no query has a signal."""
        scores = scores.float()
        saliency, saliency_mask = pack_saliency(targets, scores.shape[1], scores.device)
        if saliency is None or saliency.shape[1] < 2:
            return scores.sum() * 0.0
        rows = saliency_rows(scores, frame_mask, saliency, saliency_mask)
        width = saliency.shape[1]
        negatives = None
        if negative_scores is not None and negative_mask is not None and bool(negative_mask.any()):
            negatives = negative_scores.float()[:, :width].masked_fill(~rows["valid"], 0.0)
        if self.loss == "release":
            per_query = release_ranking_per_query(rows, self.margin)
            per_query = per_query + release_contrastive_per_query(rows, negatives, negative_mask)
            if probabilities:
                per_query = per_query + binary_relevance_bce_per_query(rows)
            counted = rows["valid"].any(1)
        else:
            if self.loss == "bce":
                logit_rows = {**rows, "scores": torch.logit(rows["scores"].clamp(1e-6, 1 - 1e-6))} if probabilities else rows
                per_query = bce_per_query(logit_rows)
            else:
                per_query = ranking_per_query(rows, self.margin) + contrastive_per_query(rows)
            counted = rows["active"]
        total = (per_query * counted).sum() / counted.sum().clamp(min=1)  # per_query is finite everywhere
        if negatives is not None:
            paired = negative_mask.to(scores.device) & rows["valid"].any(1)
            negative = negative_pair_per_query(negatives, rows["valid"], probabilities)
            total = total + (negative * paired).sum() / paired.sum().clamp(min=1)
        return total

    def terms(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """`temporal_saliency` and, with dummy tokens, `temporal_t2v_saliency` (see the module docstring)."""
        negative_mask = outputs.get("negative_mask")
        terms = {"temporal_saliency": self.term(outputs["pred_saliency"], outputs["frame_mask"], targets,
                                                         outputs.get("pred_saliency_neg"), negative_mask)}
        if outputs.get("pred_t2v_relevance") is not None:
            terms["temporal_t2v_saliency"] = self.term(
                outputs["pred_t2v_relevance"], outputs["frame_mask"], targets, outputs.get("pred_t2v_relevance_neg"),
                negative_mask, probabilities=True)
        return terms

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """saliency weight x (saliency + t2v_saliency_weight x t2v saliency)."""
        total = terms["temporal_saliency"]
        if "temporal_t2v_saliency" in terms:
            total = total + self.t2v_weight * terms["temporal_t2v_saliency"]
        return self.weight * total


class TemporalCriterion(nn.Module):
    """Named temporal losses on the final and auxiliary decoder outputs (DETR decoder).

    Span normaliser: the number of GT spans, averaged over processes when torch.distributed is
    initialised, clamped to >= 1 (`mean_spans_per_process`).

    Cost. Every term is computed for all queries (and, for the DETR decoder, all decoder layers) at once:
    per-query saliency rows and target windows are padded into (n, frames) / (n, windows) tensors with
    masks, the decoder layers' predictions are stacked so the Hungarian matcher runs once (one copy of
    the cost matrix to the host). The number of torch ops does not grow with the number of queries or
    saliency levels, and no term reads a value back from the device.
    """

    def __init__(self, matcher: SpanHungarianMatcher, span_l1_weight: float = 10.0, span_giou_weight: float = 1.0,
                 label_weight: float = 4.0, saliency_weight: float = 4.0, eos_coef: float = 0.1,
                 saliency_margin: float = 0.2, saliency_loss: str = "ranking", span_l1_reduction: str = "coordinate_sum",
                 label_reduction: str = "weight_normalised", t2v_saliency_weight: float = 1.0):
        super().__init__()
        self.saliency = SaliencyCriterion(saliency_weight, saliency_margin, saliency_loss, t2v_saliency_weight)
        self.weights = {"span_l1": span_l1_weight, "span_giou": span_giou_weight, "label": label_weight}
        if span_l1_reduction not in SPAN_L1_REDUCTIONS:
            raise ValueError(f"span_l1_reduction must be one of {SPAN_L1_REDUCTIONS}, got {span_l1_reduction!r}.")
        if label_reduction not in LABEL_REDUCTIONS:
            raise ValueError(f"label_reduction must be one of {LABEL_REDUCTIONS}, got {label_reduction!r}.")
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.span_l1_reduction = span_l1_reduction
        self.label_reduction = label_reduction

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
            if self.span_l1_reduction == "mean":  # the release: the mean over matched spans x 2 coordinates
                l1 = l1 / 2
            giou = generalized_temporal_iou(span_cw_to_se(matched_pred), matched_target)
            giou_loss = (1 - giou).view(num_layers, -1).sum(1) / num_spans
        else:
            l1 = giou_loss = pred_spans.reshape(num_layers, -1).sum(1) * 0.0
        # label CE weighted 1 (matched: foreground, class 0) or eos_coef (no object, class 1), per layer either
        # divided by the sum of the weights (ours) or a plain mean over n x Q (the release)
        nll = F.cross_entropy(pred_logits.transpose(1, 2), (~matched).long(), reduction="none")  # (L*n, Q)
        weight = torch.where(matched, 1.0, self.eos_coef)
        label = (nll * weight).view(num_layers, -1).sum(1)
        if self.label_reduction == "mean":
            label = label / nll[0].numel() / (nll.shape[0] // num_layers)
        else:
            label = label / weight.view(num_layers, -1).sum(1)
        return {"span_l1": l1, "span_giou": giou_loss, "label": label}

    def span_terms(self, outputs: dict, targets: list[dict],
                   num_spans: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """`span_l1`, `span_giou` and `label` of one decoder layer's outputs (scalars)."""
        spans, all_spans = pack_spans(targets, outputs["pred_spans"].device)
        per_layer = self.layer_span_terms([outputs], spans, all_spans, num_spans)
        return {name: values[0] for name, values in per_layer.items()}

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
        saliency = self.saliency.terms(outputs, targets)
        by_layer = {name: values.unbind(0) for name, values in per_layer.items()}
        terms = {f"temporal_{name}": values[0] for name, values in by_layer.items()}
        terms.update(saliency)
        for layer in range(1, len(layers)):  # auxiliary layers, suffixed by their index
            terms.update({f"temporal_{name}_{layer - 1}": values[layer] for name, values in by_layer.items()})
        terms["temporal"] = sum((self.weights[name] * values.sum() for name, values in per_layer.items()),
                                self.saliency.weighted(saliency))
        return terms


class DenseTemporalCriterion(nn.Module):
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
                 saliency_weight: float = 4.0, saliency_margin: float = 0.2, saliency_loss: str = "ranking",
                 t2v_saliency_weight: float = 1.0):
        super().__init__()
        self.saliency = SaliencyCriterion(saliency_weight, saliency_margin, saliency_loss, t2v_saliency_weight)
        self.weights = {"span_l1": span_l1_weight, "span_giou": span_giou_weight, "label": label_weight}

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
        terms = {"temporal_span_l1": l1, "temporal_span_giou": giou_loss, "temporal_label": label}
        total = sum(self.weights[k.removeprefix("temporal_")] * v for k, v in terms.items())
        saliency = self.saliency.terms(outputs, targets)
        terms.update(saliency)
        terms["temporal"] = total + self.saliency.weighted(saliency)
        return terms
