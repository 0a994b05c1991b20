"""Temporal IoU and Charades-STA style top-1 metrics.

Spans are (start, end) in seconds. IoU of [s1, e1] and [s2, e2] is
max(0, min(e) - max(s)) / (max(e) - min(s)) (the true union when they overlap; touching spans give 0).
"""

import numpy as np

CHARADES_THRESHOLDS = (0.3, 0.5, 0.7)


def temporal_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (n, 2) spans; a NaN prediction (missing) gives 0."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    intersection = np.clip(np.minimum(pred[:, 1], gt[:, 1]) - np.maximum(pred[:, 0], gt[:, 0]), 0, None)
    union = np.maximum(pred[:, 1], gt[:, 1]) - np.minimum(pred[:, 0], gt[:, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, 0.0)
    return np.nan_to_num(iou, nan=0.0)


def pairwise_temporal_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(n, 2) x (m, 2) -> (n, m) IoU matrix."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    intersection = np.clip(np.minimum(pred[:, None, 1], gt[None, :, 1]) - np.maximum(pred[:, None, 0], gt[None, :, 0]),
                           0, None)
    union = np.maximum(pred[:, None, 1], gt[None, :, 1]) - np.minimum(pred[:, None, 0], gt[None, :, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, intersection / union, 0.0), nan=0.0)


def charades_metrics(pred_spans, gt_spans, thresholds=CHARADES_THRESHOLDS) -> dict[str, float]:
    """R1@m and mIoU over ALL queries, x100.

    Args:
        pred_spans: (n, 2) top-1 predictions in seconds; a missing/unparseable prediction is a row of
            NaN (or None in a list) and counts as IoU 0 (it is not dropped from the denominator).
        gt_spans: (n, 2) ground truth.
    Returns:
        {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"} in percent.
    """
    pred = np.array([[np.nan, np.nan] if p is None else p for p in pred_spans], dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(gt_spans, dtype=np.float64).reshape(-1, 2)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions for {len(gt)} queries; give one (possibly None) per query.")
    if len(gt) == 0:
        raise ValueError("No queries to evaluate.")
    iou = temporal_iou(pred, gt)
    out = {f"R1@{t}": float(np.mean(iou >= t) * 100) for t in thresholds}
    out["mIoU"] = float(np.mean(iou) * 100)
    return out


def best_gt_iou(top1_spans, gt_windows: list) -> np.ndarray:
    """Per query, IoU of the top-1 prediction with the GT window it overlaps most (QVHighlights R1)."""
    out = np.zeros(len(gt_windows))
    for i, (pred, windows) in enumerate(zip(top1_spans, gt_windows)):
        if pred is None or len(windows) == 0:
            continue
        out[i] = pairwise_temporal_iou(np.asarray(pred)[None, :2], np.asarray(windows)).max()
    return out
