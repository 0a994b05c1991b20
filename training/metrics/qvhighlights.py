"""QVHighlights evaluation, following the official moment_detr `standalone_eval` protocol.

Moment retrieval (MR):
- R1@t: the top-1 window against the GT window of highest IoU with it, t in 0.5:0.05:0.95 (0.5 and
  0.7 are the reported ones);
- AP at each tIoU in 0.5:0.05:0.95: up to 10 predictions by descending score, each matched greedily
  to the unmatched GT window of highest IoU if that IoU >= t (else a false positive); precision made
  monotone from the right, AP = sum of delta-recall x precision with recall over the number of GT
  windows; mean over queries, then over thresholds (`mAP`);
- the same on GT windows by length: short (0, 10], middle (10, 30], long (30, 150] seconds (queries
  without a GT window in the range are left out of that range).
Highlight detection (HL), 2-second clips: each annotator's 0-4 scores binarised at Fair >= 2,
Good >= 3, VeryGood >= 4; Hit@1 = the top-scored clip is positive for any annotator; mAP = mean over
queries and annotators of the AP of the predicted clip scores (running-max precision averaged where
recall changes; all-negative 0, all-positive 1).
Values x100, rounded to 2 decimals (mAP averages are taken before rounding), keys as the official
evaluator names them. The matching is vectorised over queries (no per-query Python loop).

Formats: predictions `{"qid", "pred_relevant_windows": [[start, end, score], ...], "pred_saliency_scores":
[per clip]}`; ground truth QVHighlights jsonl rows (`qid`, `duration`, `relevant_windows`,
`relevant_clip_ids`, `saliency_scores`).
"""

import numpy as np

MR_THRESHOLDS = tuple(float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10))
LENGTH_RANGES = {"short": (0.0, 10.0), "middle": (10.0, 30.0), "long": (30.0, 150.0), "full": (0.0, 150.0)}
HL_THRESHOLDS = {"Fair": 2, "Good": 3, "VeryGood": 4}
MAX_PRED_WINDOWS = 10
CLIP_SECONDS = 2.0


def _round(value: float) -> float:
    return float(f"{value:.2f}")


def _pad(rows: list[np.ndarray], width: int, fill: float) -> np.ndarray:
    out = np.full((len(rows), max(width, 1), rows[0].shape[1] if rows and rows[0].ndim == 2 else 2), fill)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row[:width]
    return out


def _iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(q, p, 2) x (q, g, 2) -> (q, p, g) IoU; NaN rows (padding) give 0."""
    left = np.maximum(pred[:, :, None, 0], gt[:, None, :, 0])
    right = np.minimum(pred[:, :, None, 1], gt[:, None, :, 1])
    intersection = np.clip(right - left, 0, None)
    union = np.maximum(pred[:, :, None, 1], gt[:, None, :, 1]) - np.minimum(pred[:, :, None, 0], gt[:, None, :, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, intersection / union, 0.0), nan=0.0)


def _average_precision_batched(true_positive: np.ndarray, pred_valid: np.ndarray, num_gt: np.ndarray) -> np.ndarray:
    """Interpolated AP per query from (q, p) true-positive flags in score order."""
    tp = np.where(pred_valid, true_positive, 0).astype(np.float64)
    fp = np.where(pred_valid, 1 - true_positive, 0).astype(np.float64)
    tp_cumsum, fp_cumsum = np.cumsum(tp, 1), np.cumsum(fp, 1)
    recall = tp_cumsum / np.maximum(num_gt, 1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp_cumsum / (tp_cumsum + fp_cumsum), nan=0.0)
    # Positions past the last valid prediction repeat the last recall (no change -> no contribution).
    zeros = np.zeros((len(tp), 1))
    m_precision = np.concatenate([zeros, precision, zeros], 1)
    m_recall = np.concatenate([zeros, recall, np.ones((len(tp), 1))], 1)
    m_precision = np.maximum.accumulate(m_precision[:, ::-1], axis=1)[:, ::-1]
    delta = np.diff(m_recall, axis=1)  # (q, p + 1)
    return np.sum(delta * m_precision[:, 1:], axis=1)


def moment_retrieval_metrics(predictions: list[list], ground_truth: list[list], thresholds=MR_THRESHOLDS) -> dict:
    """Per-threshold R1 and AP, aligned lists of per-query predicted windows [[s, e, score], ...] (score
    order is decided here) and GT windows [[s, e], ...]. Returns {"R1": {t: %}, "mAP": {t: %, "average": %}}."""
    num_queries = len(ground_truth)
    preds, scores = [], []
    for windows in predictions:
        array = np.asarray(windows, dtype=np.float64).reshape(-1, 3) if len(windows) else np.zeros((0, 3))
        order = np.argsort(-array[:, 2], kind="stable")[:MAX_PRED_WINDOWS]
        preds.append(array[order, :2])
        scores.append(array[order, 2])
    gts = [np.asarray(w, dtype=np.float64).reshape(-1, 2) for w in ground_truth]
    pred = _pad(preds, MAX_PRED_WINDOWS, np.nan)
    gt = _pad(gts, max(len(g) for g in gts), np.nan)
    pred_valid = ~np.isnan(pred[..., 0])
    gt_valid = ~np.isnan(gt[..., 0])
    num_gt = gt_valid.sum(1)
    iou = _iou_matrix(pred, gt)  # (q, p, g)
    iou = np.where(gt_valid[:, None, :], iou, -1.0)

    r1_iou = np.where(pred_valid[:, 0], iou[:, 0].max(1), 0.0)  # top-1 vs its best GT window
    r1 = {str(t): _round(np.mean(r1_iou >= t) * 100) for t in thresholds}

    rows = np.arange(num_queries)
    ap_per_threshold = []
    for threshold in thresholds:
        matched = np.zeros_like(gt_valid)
        true_positive = np.zeros(pred_valid.shape, dtype=bool)
        for rank in range(pred.shape[1]):
            candidate = np.where(matched | ~gt_valid, -1.0, iou[:, rank])  # (q, g)
            best = candidate.argmax(1)
            hit = (candidate[rows, best] >= threshold) & pred_valid[:, rank]
            true_positive[:, rank] = hit
            matched[rows[hit], best[hit]] = True
        ap_per_threshold.append(_average_precision_batched(true_positive, pred_valid, num_gt))
    ap = np.stack(ap_per_threshold, 1).mean(0)  # mean over queries per threshold
    mean_ap = {str(t): v for t, v in zip(thresholds, ap)}
    mean_ap["average"] = float(np.mean(ap))
    return {"R1": r1, "mAP": {k: _round(v * 100) for k, v in mean_ap.items()}}


def _highlight_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP of scores against binary labels: running-max precision averaged where recall changes;
    all-negative 0, all-positive 1."""
    if not labels.any():
        return 0.0
    if labels.all():
        return 1.0
    ordered = labels[np.argsort(-scores, kind="stable")].astype(np.float64)
    tp = np.cumsum(ordered)
    precision = tp / np.arange(1, len(ordered) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(precision[ordered == 1].mean())


def highlight_metrics(pred_scores: list, gt_clip_scores: list[np.ndarray]) -> dict:
    """{"HL-min-<level>": {"HL-mAP": %, "HL-Hit1": %}} from per-clip predicted scores and (num_clips, 3)
    annotator score arrays (0 for clips that are not relevant)."""
    out = {}
    for name, minimum in HL_THRESHOLDS.items():
        hits, aps = [], []
        for scores, gt in zip(pred_scores, gt_clip_scores):
            binary = gt >= minimum  # (clips, 3)
            scores = np.asarray(scores, dtype=np.float64)[: len(binary)]
            if len(scores) < len(binary):
                scores = np.concatenate([scores, np.full(len(binary) - len(scores), -np.inf)])
            top = int(np.argmax(scores)) if len(scores) else 0
            hits.append(bool(binary[top].any()) if len(binary) else False)
            aps.extend(_highlight_ap(binary[:, j], scores) for j in range(binary.shape[1]))
        out[f"HL-min-{name}"] = {"HL-mAP": _round(np.mean(aps) * 100), "HL-Hit1": _round(np.mean(hits) * 100)}
    return out


def gt_clip_scores(record: dict) -> np.ndarray:
    """(num_clips, 3) annotator scores over the whole video from a QVHighlights GT row."""
    num_clips = int(round(float(record["duration"]) / CLIP_SECONDS))
    scores = np.zeros((num_clips, 3), dtype=np.int64)
    for clip, values in zip(record.get("relevant_clip_ids", []), record.get("saliency_scores", [])):
        if 0 <= int(clip) < num_clips:
            scores[int(clip)] = values
    return scores


def qvhighlights_metrics(submission: list[dict], ground_truth: list[dict], match_number: bool = True) -> dict:
    """The official QVHighlights evaluation of a submission against GT rows.

    With `match_number` (the official default) every GT qid must have a prediction and vice versa (a
    ValueError lists the missing ones); without it, only the shared qids are evaluated, as the official
    evaluator does with `match_number=False`.
    Returns the brief keys (`MR-full-R1@0.5`, `MR-full-R1@0.7`, `MR-full-mAP`, `MR-full-mAP@0.5`,
    `MR-full-mAP@0.75`, `MR-short-mAP`, `MR-middle-mAP`, `MR-long-mAP`, `HL-min-VeryGood-mAP`,
    `HL-min-VeryGood-Hit1`, ...) and, under "full", the nested per-threshold metrics.
    """
    predictions = {d["qid"]: d for d in submission}
    truths = {d["qid"]: d for d in ground_truth}
    if match_number:
        missing, extra = sorted(set(truths) - set(predictions), key=str), sorted(set(predictions) - set(truths), key=str)
        if missing or extra:
            raise ValueError(f"Submission and ground truth differ: {len(missing)} GT qid(s) without prediction "
                             f"(e.g. {missing[:5]}), {len(extra)} unknown qid(s) (e.g. {extra[:5]}).")
    qids = [q for q in truths if q in predictions]
    if not qids:
        raise ValueError("No query of the ground truth has a prediction.")
    brief, full = {}, {}
    if all("relevant_windows" in truths[q] for q in qids):
        for name, (low, high) in LENGTH_RANGES.items():
            kept = []
            for q in qids:
                windows = [w for w in truths[q]["relevant_windows"] if name == "full" or low < (w[1] - w[0]) <= high]
                if windows:
                    kept.append((q, windows))
            if not kept:
                metrics = {"R1": {str(t): 0.0 for t in MR_THRESHOLDS}, "mAP": {**{str(t): 0.0 for t in MR_THRESHOLDS},
                                                                               "average": 0.0}}
            else:
                metrics = moment_retrieval_metrics([predictions[q]["pred_relevant_windows"] for q, _ in kept],
                                                   [w for _, w in kept])
            full[f"MR-{name}"] = {"MR-mAP": metrics["mAP"], "MR-R1": metrics["R1"], "num_queries": len(kept)}
            brief[f"MR-{name}-mAP"] = metrics["mAP"]["average"]
            brief[f"MR-{name}-mAP@0.5"] = metrics["mAP"]["0.5"]
            brief[f"MR-{name}-mAP@0.75"] = metrics["mAP"]["0.75"]
            brief[f"MR-{name}-R1@0.5"] = metrics["R1"]["0.5"]
            brief[f"MR-{name}-R1@0.7"] = metrics["R1"]["0.7"]
    if all("pred_saliency_scores" in predictions[q] for q in qids) and all("saliency_scores" in truths[q] for q in qids):
        highlight = highlight_metrics([predictions[q]["pred_saliency_scores"] for q in qids],
                                      [gt_clip_scores(truths[q]) for q in qids])
        full.update(highlight)
        for level, values in highlight.items():
            brief[f"{level}-mAP"] = values["HL-mAP"]
            brief[f"{level}-Hit1"] = values["HL-Hit1"]
    return {**brief, "full": full}


def to_submission(qid, windows_seconds: list[list[float]], clip_scores: list[float] | None = None) -> dict:
    """One line of the official submission format."""
    row = {"qid": qid, "pred_relevant_windows": [[float(s), float(e), float(c)] for s, e, c in windows_seconds]}
    if clip_scores is not None:
        row["pred_saliency_scores"] = [float(v) for v in clip_scores]
    return row
