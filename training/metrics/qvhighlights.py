"""QVHighlights evaluation, following the official moment_detr `standalone_eval/eval.py` protocol.

Moment retrieval (MR), per query:
- up to 10 predicted windows: the FIRST 10 of `pred_relevant_windows` in submission order (the
  official cut), then ordered by descending score (stable);
- R1@t: the first submitted window against the GT window of highest IoU with it, t in 0.5:0.05:0.95;
- AP at each tIoU t in 0.5:0.05:0.95: predictions in score order are matched greedily to the
  not-yet-matched GT window of highest IoU if that IoU >= t (among equal IoUs the later GT window, as
  the official `argsort()[::-1]` does), else they are false positives; precision is made monotone
  from the right and AP = sum of delta-recall x precision, recall over the number of GT windows;
- mAP: AP averaged over queries, then over the 10 thresholds; reported for all GT windows ("full") and
  by GT window length: short (0, 10], middle (10, 30], long (30, 150] seconds (only the GT windows in
  the range are kept, and only queries with at least one; "full" keeps every window).
Highlight detection (HL), on 2-second clips, `num_clips = int(duration / 2)`:
- each annotator's 0-4 clip scores are binarised at Fair >= 2, Good >= 3, VeryGood >= 4;
- Hit@1: the argmax of `pred_saliency_scores` (first on ties) is a hit if positive for any annotator
  (an index past the video is a miss);
- AP per query and annotator: the predicted scores (cut or zero-padded to `num_clips`) against the
  annotator's binary labels, as `get_ap` with scikit-learn's precision-recall curve: one point per
  distinct score (tied clips enter together), precision made monotone by a running max from the
  high-recall end, averaged over the points where recall changes; all-negative 0, all-positive 1.
  mAP = mean over queries and the 3 annotators.
All values x100, rounded to 2 decimals (averages taken before rounding), keys as the official evaluator
names them: `MR-full-mAP`, `MR-full-mAP@0.5`, `MR-full-mAP@0.75`, `MR-short-mAP`, `MR-middle-mAP`,
`MR-long-mAP`, `MR-full-R1@0.5`, `MR-full-R1@0.7`, `HL-min-{Fair,Good,VeryGood}-{mAP,Hit1}`.

Where the official script crashes or silently drops a query, this module decides as follows (the
"no prediction is wrong" rule of Charades-STA): a query with no predicted window has R1 IoU 0 and AP 0
(the official script drops it from mAP); an empty `pred_saliency_scores` has HL AP 0 and no hit; a
query without GT window is left out of MR with a logged warning (the official script crashes); a
length range with no query gives NaN (the official script would divide by zero); a relevant clip past
`int(duration / 2)` extends that video's clips (the official script raises an IndexError).

Everything is vectorised over queries; the only Python loops are over the 10 prediction ranks (greedy
matching) and over the parsed rows. File formats: predictions in the official submission format
`{"qid", "pred_relevant_windows": [[start, end, score], ...], "pred_saliency_scores": [per clip]}`,
ground truth QVHighlights jsonl rows `{"qid", "duration", "relevant_windows": [[start, end], ...],
"relevant_clip_ids": [...], "saliency_scores": [[a1, a2, a3], ...]}` (seconds).
"""

import logging
import math

import numpy as np

from .temporal import batched_pairwise_temporal_iou, pad_ragged

logger = logging.getLogger(__name__)

MR_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
LENGTH_RANGES_SECONDS = {"short": (0.0, 10.0), "middle": (10.0, 30.0), "long": (30.0, 150.0), "full": (0.0, 150.0)}
HL_MIN_SCORES = {"Fair": 2, "Good": 3, "VeryGood": 4}
MAX_PRED_WINDOWS = 10
CLIP_LENGTH_SECONDS = 2.0
NUM_ANNOTATORS = 3
ON_MISSING_CHOICES = ("error", "wrong", "drop")


def official_round(value: float) -> float:
    """x100 and 2 decimals, as the official evaluator formats every metric (NaN stays NaN)."""
    return float("nan") if math.isnan(value) else float(f"{100 * value:.2f}")


# ----------------------------------------------------------------------------------------------------
# Moment retrieval
# ----------------------------------------------------------------------------------------------------


def _greedy_true_positives(iou: np.ndarray, pred_valid: np.ndarray, gt_valid: np.ndarray,
                           thresholds: np.ndarray) -> np.ndarray:
    """Greedy matching of score-ordered predictions to GT windows at every threshold at once.

    Args:
        iou: `(q, p, g)` IoU of each prediction (score order) with each GT window.
        pred_valid, gt_valid: `(q, p)`, `(q, g)` masks of real (not padding) items.
        thresholds: `(t,)` tIoU thresholds.
    Returns:
        `(q, t, p)` bool: prediction is a true positive at that threshold.
    """
    num_queries, num_pred, num_gt = iou.shape
    candidates_iou = np.where(gt_valid[:, None, :], iou, -np.inf)
    locked = np.zeros((num_queries, len(thresholds), num_gt), dtype=bool)
    true_positive = np.zeros((num_queries, len(thresholds), num_pred), dtype=bool)
    gt_index = np.arange(num_gt)
    for rank in range(num_pred):
        candidate = np.where(locked, -np.inf, candidates_iou[:, None, rank, :])  # (q, t, g)
        # Highest IoU, the LAST GT window among ties (the official loop walks argsort()[::-1]).
        best = num_gt - 1 - np.argmax(candidate[..., ::-1], axis=-1)  # (q, t)
        best_iou = np.take_along_axis(candidate, best[..., None], axis=-1)[..., 0]
        hit = (best_iou >= thresholds[None, :]) & pred_valid[:, rank, None]
        true_positive[:, :, rank] = hit
        locked |= hit[..., None] & (gt_index == best[..., None])
    return true_positive


def _interpolated_average_precision(true_positive: np.ndarray, pred_valid: np.ndarray,
                                    num_gt: np.ndarray) -> np.ndarray:
    """`(q, t, p)` true-positive flags in score order -> `(q, t)` AP (ActivityNet-style interpolation)."""
    valid = np.broadcast_to(pred_valid[:, None, :], true_positive.shape)
    tp_cumsum = np.cumsum(true_positive & valid, axis=-1).astype(np.float64)
    fp_cumsum = np.cumsum(~true_positive & valid, axis=-1).astype(np.float64)
    recall = tp_cumsum / num_gt[:, None, None]
    seen = tp_cumsum + fp_cumsum
    precision = np.divide(tp_cumsum, seen, out=np.zeros_like(seen), where=seen > 0)
    # Padding ranks repeat the last recall and precision, so they add nothing.
    zeros = np.zeros(precision.shape[:2] + (1,))
    m_precision = np.concatenate([zeros, precision, zeros], axis=-1)
    m_recall = np.concatenate([zeros, recall, np.ones_like(zeros)], axis=-1)
    m_precision = np.maximum.accumulate(m_precision[..., ::-1], axis=-1)[..., ::-1]
    return np.sum(np.diff(m_recall, axis=-1) * m_precision[..., 1:], axis=-1)


def moment_retrieval_arrays(pred_windows: np.ndarray, gt_windows_seconds: np.ndarray,
                            thresholds=MR_IOU_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per-query R1 IoU and AP from padded arrays.

    Args:
        pred_windows: `(q, p, 3)` `[start, end, score]` in seconds in SUBMISSION order, at most the 10
            kept ones, NaN rows for padding (a query with only NaN rows has no prediction).
        gt_windows_seconds: `(q, g, 2)` GT windows, NaN rows for padding; every query needs one.
        thresholds: tIoU thresholds.
    Returns:
        `r1_iou (q,)`: IoU of the first window with its best GT window (0 without prediction);
        `ap (q, t)`: AP per query and threshold.
    """
    pred_valid_in_order = ~np.isnan(pred_windows[..., 0])
    gt_valid = ~np.isnan(gt_windows_seconds[..., 0])
    num_gt = gt_valid.sum(axis=1)
    if (num_gt == 0).any():
        raise ValueError("moment_retrieval_arrays: every query needs at least one GT window.")
    first_iou = batched_pairwise_temporal_iou(pred_windows[:, :1, :2], gt_windows_seconds)[:, 0, :]
    r1_iou = np.where(pred_valid_in_order[:, 0], np.where(gt_valid, first_iou, 0.0).max(axis=1), 0.0)

    scores = np.where(pred_valid_in_order, pred_windows[..., 2], -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")  # Python's stable sort by -score; padding last
    ordered = np.take_along_axis(pred_windows, order[..., None], axis=1)
    pred_valid = np.take_along_axis(pred_valid_in_order, order, axis=1)
    iou = batched_pairwise_temporal_iou(ordered[..., :2], gt_windows_seconds)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    true_positive = _greedy_true_positives(iou, pred_valid, gt_valid, thresholds)
    return r1_iou, _interpolated_average_precision(true_positive, pred_valid, num_gt)


def _mr_summary(r1_iou: np.ndarray, ap: np.ndarray, thresholds) -> dict:
    """Official `{"MR-mAP": {t: %, "average": %}, "MR-R1": {t: %}}` (NaN when there is no query)."""
    if len(r1_iou) == 0:
        nan = float("nan")
        return {"MR-mAP": {**{str(t): nan for t in thresholds}, "average": nan}, "MR-R1": {str(t): nan for t in thresholds}}
    ap_per_threshold = ap.mean(axis=0)
    mean_ap = {str(t): official_round(v) for t, v in zip(thresholds, ap_per_threshold)}
    mean_ap["average"] = official_round(float(np.mean(ap_per_threshold)))
    return {"MR-mAP": mean_ap, "MR-R1": {str(t): official_round(float(np.mean(r1_iou >= t))) for t in thresholds}}


def moment_retrieval_metrics(pred_windows: list, gt_windows_seconds: list, thresholds=MR_IOU_THRESHOLDS) -> dict:
    """Official MR metrics of aligned per-query lists (no length filtering).

    Args:
        pred_windows: per query a list of `[start, end, score]` (seconds), submission order (empty = no
            prediction); only the first 10 count.
        gt_windows_seconds: per query a non-empty list of `[start, end]`.
    Returns:
        `{"MR-mAP": {"0.5": %, ..., "0.95": %, "average": %}, "MR-R1": {"0.5": %, ...}}`.
    """
    pred = pad_ragged([_prediction_array(w, i) for i, w in enumerate(pred_windows)], MAX_PRED_WINDOWS, 3)
    gts = [np.asarray(w, dtype=np.float64).reshape(-1, 2) for w in gt_windows_seconds]
    gt = pad_ragged(gts, max((len(g) for g in gts), default=1), 2)
    r1_iou, ap = moment_retrieval_arrays(pred, gt, thresholds)
    return _mr_summary(r1_iou, ap, thresholds)


def _prediction_array(windows, qid) -> np.ndarray:
    array = np.asarray(windows if windows is not None else [], dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 3))
    if array.ndim != 2 or array.shape[1] < 3:
        raise ValueError(f"qid {qid!r}: pred_relevant_windows must be [[start, end, score], ...] in seconds, "
                         f"got an array of shape {array.shape}.")
    array = array[:MAX_PRED_WINDOWS, :3]
    if not np.isfinite(array).all():
        raise ValueError(f"qid {qid!r}: pred_relevant_windows contains NaN or infinite values.")
    return array


def _gt_window_array(windows, qid) -> np.ndarray:
    array = np.asarray(windows if windows is not None else [], dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 2))
    if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise ValueError(f"qid {qid!r}: relevant_windows must be [[start, end], ...] in seconds, got {windows!r}.")
    return array


# ----------------------------------------------------------------------------------------------------
# Highlight detection
# ----------------------------------------------------------------------------------------------------


def _sorted_average_precision(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """AP of `(q, c)` scores against `(q, c, k)` binary labels over the valid clips `(q, c)`, with tied
    scores entering together (one precision-recall point per distinct score) -> `(q, k)`."""
    num_queries, num_clips = scores.shape
    order = np.lexsort((-scores, ~valid), axis=-1)  # valid clips first, then by descending score
    s_scores = np.take_along_axis(scores, order, axis=1)
    s_valid = np.take_along_axis(valid, order, axis=1)
    s_labels = np.take_along_axis(labels, order[..., None], axis=1) & s_valid[..., None]
    positions = np.arange(num_clips)
    next_differs = np.ones_like(s_valid)
    next_differs[:, :-1] = (s_scores[:, 1:] != s_scores[:, :-1]) | ~s_valid[:, 1:]
    is_end = s_valid & next_differs  # last clip of a group of equal scores
    is_start = s_valid.copy()
    is_start[:, 1:] &= s_scores[:, 1:] != s_scores[:, :-1]
    start = np.maximum.accumulate(np.where(is_start, positions, 0), axis=1)  # (q, c)

    tp_cumsum = np.cumsum(s_labels, axis=1, dtype=np.int64)  # (q, c, k)
    before = np.take_along_axis(tp_cumsum, np.maximum(start - 1, 0)[..., None], axis=1)
    tp_before_group = np.where((start > 0)[..., None], before, 0)
    counted = is_end[..., None] & (tp_cumsum > tp_before_group)  # the group raises recall
    precision = np.where(is_end[..., None], tp_cumsum / (positions + 1)[None, :, None], 0.0)
    interpolated = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # max over higher recall
    num_points = counted.sum(axis=1)
    ap = np.where(counted, interpolated, 0.0).sum(axis=1) / np.maximum(num_points, 1)

    num_positive = tp_cumsum[:, -1]  # (q, k)
    num_valid = s_valid.sum(axis=1)[:, None]
    ap = np.where(num_positive == 0, 0.0, ap)
    return np.where((num_positive == num_valid) & (num_valid > 0), 1.0, ap)


def highlight_arrays(pred_saliency: np.ndarray, gt_scores: np.ndarray, num_clips: np.ndarray) -> dict:
    """Per-query HL results from padded arrays.

    Args:
        pred_saliency: `(q, s)` predicted clip scores, NaN padding (a row of only NaN = no prediction).
        gt_scores: `(q, c, 3)` annotator scores 0-4 over the whole video (0 for non-relevant clips).
        num_clips: `(q,)` clips per video, `int(duration / 2)`.
    Returns:
        `{level: (ap (q, 3), hit (q,))}` for Fair, Good and VeryGood.
    """
    num_queries, max_clips = gt_scores.shape[:2]
    num_pred = (~np.isnan(pred_saliency)).sum(axis=1)
    has_prediction = num_pred > 0
    top_clip = np.argmax(np.where(np.isnan(pred_saliency), -np.inf, pred_saliency), axis=1)
    clip_valid = np.arange(max_clips)[None, :] < num_clips[:, None]
    # The official cut / zero-padding of the predicted scores to the video's clips.
    scores = np.zeros((num_queries, max_clips))
    width = min(pred_saliency.shape[1], max_clips)
    scores[:, :width] = np.nan_to_num(pred_saliency[:, :width], nan=0.0)
    levels = np.array(list(HL_MIN_SCORES.values()))
    binary = gt_scores[..., None] >= levels  # (q, c, 3 annotators, 3 levels)
    labels = binary.reshape(num_queries, max_clips, -1)
    ap = _sorted_average_precision(scores, labels, clip_valid).reshape(num_queries, NUM_ANNOTATORS, len(levels))
    ap = np.where(has_prediction[:, None, None], ap, 0.0)
    in_video = top_clip < num_clips
    top_labels = binary[np.arange(num_queries), np.minimum(top_clip, max(max_clips - 1, 0))]  # (q, 3, levels)
    hit = top_labels.any(axis=1) & (in_video & has_prediction)[:, None]
    return {name: (ap[:, :, i], hit[:, i]) for i, name in enumerate(HL_MIN_SCORES)}


def gt_clip_scores(record: dict) -> np.ndarray:
    """`(num_clips, 3)` annotator scores over the whole video from a QVHighlights GT row
    (`num_clips = int(duration / 2)`; clips outside `relevant_clip_ids` score 0). A relevant clip past
    the end (a probed duration a little short of the annotated one) extends the video to include it,
    where the official script would stop with an IndexError."""
    clip_ids = np.asarray(record.get("relevant_clip_ids", []), dtype=np.int64).reshape(-1)
    values = np.asarray(record.get("saliency_scores", []), dtype=np.int64).reshape(-1, NUM_ANNOTATORS)
    if len(clip_ids) != len(values):
        raise ValueError(f"qid {record.get('qid')!r}: {len(clip_ids)} relevant_clip_ids for {len(values)} "
                         f"saliency_scores rows; they must align.")
    if len(clip_ids) and clip_ids.min() < 0:
        raise ValueError(f"qid {record.get('qid')!r}: negative relevant clip id {int(clip_ids.min())}.")
    num_clips = int(float(record["duration"]) / CLIP_LENGTH_SECONDS)
    num_clips = max(num_clips, int(clip_ids.max()) + 1 if len(clip_ids) else 0)
    scores = np.zeros((num_clips, NUM_ANNOTATORS), dtype=np.int64)
    scores[clip_ids] = values
    return scores


def highlight_metrics(pred_saliency_scores: list, gt_clip_score_arrays: list) -> dict:
    """Official HL metrics of aligned per-query lists.

    Args:
        pred_saliency_scores: per query the predicted score of each 2-second clip (empty = no prediction).
        gt_clip_score_arrays: per query `(num_clips, 3)` annotator scores (`gt_clip_scores`).
    Returns:
        `{"HL-min-Fair": {"HL-mAP": %, "HL-Hit1": %}, "HL-min-Good": ..., "HL-min-VeryGood": ...}`.
    """
    if len(pred_saliency_scores) != len(gt_clip_score_arrays):
        raise ValueError(f"{len(pred_saliency_scores)} saliency predictions for {len(gt_clip_score_arrays)} queries.")
    if not gt_clip_score_arrays:
        raise ValueError("No queries to evaluate.")
    num_clips = np.array([len(g) for g in gt_clip_score_arrays])
    gt = pad_ragged([np.asarray(g).reshape(-1, NUM_ANNOTATORS) for g in gt_clip_score_arrays],
                    int(num_clips.max()), NUM_ANNOTATORS, fill=0).astype(np.int64)
    lengths = [len(s) if s is not None else 0 for s in pred_saliency_scores]
    pred = pad_ragged([np.asarray(s if s is not None else [], dtype=np.float64).reshape(-1, 1)
                       for s in pred_saliency_scores], max(lengths), 1)[..., 0]
    per_level = highlight_arrays(pred, gt, num_clips)
    return {f"HL-min-{name}": {"HL-mAP": official_round(float(np.mean(ap))), "HL-Hit1": official_round(float(np.mean(hit)))}
            for name, (ap, hit) in per_level.items()}


# ----------------------------------------------------------------------------------------------------
# Submission-level evaluation
# ----------------------------------------------------------------------------------------------------


def _index_by_qid(rows: list[dict], what: str) -> dict:
    out = {}
    for line, row in enumerate(rows, 1):
        if "qid" not in row:
            raise ValueError(f"{what} row {line}: no 'qid' field.")
        if row["qid"] in out:
            raise ValueError(f"{what} row {line}: qid {row['qid']!r} appears twice; keep one row per query.")
        out[row["qid"]] = row
    return out


def _align(submission: list[dict], ground_truth: list[dict], on_missing: str) -> tuple[list, dict, dict]:
    """The evaluated qids (GT order) and both sides indexed by qid, after the `on_missing` policy."""
    if on_missing not in ON_MISSING_CHOICES:
        raise ValueError(f"on_missing must be one of {ON_MISSING_CHOICES}, got {on_missing!r}.")
    predictions = _index_by_qid(submission, "submission")
    truths = _index_by_qid(ground_truth, "ground truth")
    missing = [q for q in truths if q not in predictions]
    extra = [q for q in predictions if q not in truths]
    if on_missing == "error" and (missing or extra):
        raise ValueError(f"Submission and ground truth differ: {len(missing)} GT qid(s) without prediction "
                         f"(e.g. {missing[:5]}), {len(extra)} qid(s) not in the ground truth (e.g. {extra[:5]}). "
                         f"Pass on_missing='wrong' to count missing queries as wrong, or 'drop' to evaluate "
                         f"only the shared ones (the official match_number=False).")
    if extra:
        logger.warning("%d predicted qid(s) are not in the ground truth and are ignored (e.g. %s).", len(extra), extra[:5])
    if missing:
        logger.warning("%d GT qid(s) have no prediction; they are %s (e.g. %s).", len(missing),
                       "counted as wrong" if on_missing == "wrong" else "left out", missing[:5])
    qids = list(truths) if on_missing == "wrong" else [q for q in truths if q in predictions]
    if not qids:
        raise ValueError("No query of the ground truth has a prediction.")
    return qids, predictions, truths


def _has_field(rows: list[dict], field: str, what: str) -> bool:
    """True if every row has `field`, False if none has; an error naming a row if only some have it."""
    present = [field in row for row in rows]
    if all(present):
        return True
    if any(present):
        row = rows[present.index(False)]
        raise ValueError(f"{what} qid {row.get('qid')!r} has no {field!r} while other rows do; give every row "
                         f"the field (an empty list for no prediction).")
    return False


def _evaluate_moment_retrieval(qids: list, predictions: dict, truths: dict) -> dict:
    pred_rows = [_prediction_array(predictions[q]["pred_relevant_windows"] if q in predictions else [], q) for q in qids]
    gt_rows = [_gt_window_array(truths[q].get("relevant_windows"), q) for q in qids]
    without_gt = [q for q, g in zip(qids, gt_rows) if len(g) == 0]
    if without_gt:
        logger.warning("%d quer(ies) have no GT window and are left out of moment retrieval (e.g. %s).",
                       len(without_gt), without_gt[:5])
    pred = pad_ragged(pred_rows, MAX_PRED_WINDOWS, 3)
    gt = pad_ragged(gt_rows, max(len(g) for g in gt_rows), 2)
    gt_valid = ~np.isnan(gt[..., 0])
    lengths = gt[..., 1] - gt[..., 0]
    out = {}
    for name, (low, high) in LENGTH_RANGES_SECONDS.items():
        in_range = gt_valid if name == "full" else gt_valid & (lengths > low) & (lengths <= high)
        kept = in_range.any(axis=1)
        if kept.any():
            r1_iou, ap = moment_retrieval_arrays(pred[kept], np.where(in_range[kept, :, None], gt[kept], np.nan))
        else:
            logger.info("No query has a GT window in the %s range %s s; its metrics are NaN.", name, (low, high))
            r1_iou, ap = np.zeros(0), np.zeros((0, len(MR_IOU_THRESHOLDS)))
        out[name] = _mr_summary(r1_iou, ap, MR_IOU_THRESHOLDS)
    return out


def _evaluate_highlights(qids: list, predictions: dict, truths: dict) -> dict:
    scores = [predictions[q].get("pred_saliency_scores", []) if q in predictions else [] for q in qids]
    gt_scores = [gt_clip_scores(truths[q]) for q in qids]
    extended = [q for q, g in zip(qids, gt_scores) if len(g) > int(float(truths[q]["duration"]) / CLIP_LENGTH_SECONDS)]
    if extended:
        logger.warning("%d quer(ies) have relevant clips past int(duration / 2); their videos were extended to "
                       "include them (e.g. %s).", len(extended), extended[:5])
    return highlight_metrics(scores, gt_scores)


def qvhighlights_eval(submission: list[dict], ground_truth: list[dict], on_missing: str = "error") -> dict:
    """The official QVHighlights evaluation, with the official output structure.

    Args:
        submission: rows `{"qid", "pred_relevant_windows": [[start, end, score], ...],
            "pred_saliency_scores": [...]}` (either field may be absent from every row).
        ground_truth: QVHighlights rows `{"qid", "duration", "relevant_windows", "relevant_clip_ids",
            "saliency_scores"}`.
        on_missing: qids on one side only: "error" (the official default `match_number=True`), "wrong"
            (a GT qid without prediction counts as a query with no prediction; unknown predicted qids
            are ignored), or "drop" (only shared qids, the official `match_number=False`).
    Returns:
        `{"brief": {key: %}, "HL-min-Fair": {...}, ..., "full": {"MR-mAP": {...}, "MR-R1": {...}},
        "long": ..., "middle": ..., "short": ...}`.
    """
    qids, predictions, truths = _align(submission, ground_truth, on_missing)
    evaluated_predictions = [predictions[q] for q in qids if q in predictions]
    brief, details = {}, {}
    if _has_field(evaluated_predictions, "pred_relevant_windows", "submission"):
        mr = _evaluate_moment_retrieval(qids, predictions, truths)
        details.update(mr)
        mr_brief = {
            "MR-full-mAP": mr["full"]["MR-mAP"]["average"], "MR-full-mAP@0.5": mr["full"]["MR-mAP"]["0.5"],
            "MR-full-mAP@0.75": mr["full"]["MR-mAP"]["0.75"], "MR-short-mAP": mr["short"]["MR-mAP"]["average"],
            "MR-middle-mAP": mr["middle"]["MR-mAP"]["average"], "MR-long-mAP": mr["long"]["MR-mAP"]["average"],
            "MR-full-R1@0.5": mr["full"]["MR-R1"]["0.5"], "MR-full-R1@0.7": mr["full"]["MR-R1"]["0.7"],
        }
        brief.update(sorted(mr_brief.items()))
    if _has_field(evaluated_predictions, "pred_saliency_scores", "submission"):
        if not _has_field([truths[q] for q in qids], "saliency_scores", "ground truth"):
            raise ValueError("The submission has pred_saliency_scores but the ground truth has no saliency_scores; "
                             "remove the scores or use ground truth with highlight annotations.")
        highlight = _evaluate_highlights(qids, predictions, truths)
        details.update(highlight)
        for level, values in highlight.items():
            brief[f"{level}-mAP"] = values["HL-mAP"]
            brief[f"{level}-Hit1"] = values["HL-Hit1"]
    if not brief:
        raise ValueError("The submission has neither pred_relevant_windows nor pred_saliency_scores.")
    return {"brief": brief, **dict(sorted(details.items()))}


def qvhighlights_metrics(submission: list[dict], ground_truth: list[dict], on_missing: str = "error") -> dict[str, float]:
    """The official brief metrics as a flat `dict[str, float]` (`MR-full-R1@0.5`, `MR-full-mAP`,
    `HL-min-VeryGood-mAP`, ...); see `qvhighlights_eval` for the arguments."""
    return qvhighlights_eval(submission, ground_truth, on_missing)["brief"]


def to_submission(qid, windows: list, clip_scores: list | None = None) -> dict:
    """One row of the official submission format from `[[start, end, score], ...]` (seconds), ordered by
    descending score (so the official first-10 cut and R1 use the best windows), and optional per-clip
    saliency scores."""
    rows = [[float(w[0]), float(w[1]), float(w[2])] for w in windows]
    rows.sort(key=lambda w: -w[2])
    out = {"qid": qid, "pred_relevant_windows": rows}
    if clip_scores is not None:
        out["pred_saliency_scores"] = [float(v) for v in clip_scores]
    return out


def predictions_to_submission(qids: list, spans_seconds: np.ndarray, span_scores: np.ndarray,
                              saliency_scores: np.ndarray | None = None, clip_valid=None) -> list[dict]:
    """Batched model outputs -> official submission rows.

    Args:
        qids: `(q,)` query ids.
        spans_seconds: `(q, p, 2)` predicted windows in seconds.
        span_scores: `(q, p)` their confidence (higher first; the best 10 are kept).
        saliency_scores: optional `(q, c)` per-clip scores (one per 2-second clip).
        clip_valid: optional `(q, c)` mask of the clips inside each video (padding dropped).
    """
    spans_seconds, span_scores = np.asarray(spans_seconds, dtype=np.float64), np.asarray(span_scores, dtype=np.float64)
    order = np.argsort(-span_scores, axis=1, kind="stable")[:, :MAX_PRED_WINDOWS]
    spans = np.take_along_axis(spans_seconds, order[..., None], axis=1)
    scores = np.take_along_axis(span_scores, order, axis=1)
    windows = np.concatenate([spans, scores[..., None]], axis=-1)
    rows = []
    for index, qid in enumerate(qids):
        row = {"qid": qid, "pred_relevant_windows": windows[index].tolist()}
        if saliency_scores is not None:
            clip_scores = np.asarray(saliency_scores[index], dtype=np.float64)
            if clip_valid is not None:
                clip_scores = clip_scores[np.asarray(clip_valid[index], dtype=bool)]
            row["pred_saliency_scores"] = clip_scores.tolist()
        rows.append(row)
    return rows
