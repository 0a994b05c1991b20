"""Single-object tracking metrics: LaSOT (success AUC, precision@20px, normalised precision) and
GOT-10k (AO, SR0.5, SR0.75). Boxes are (x, y, w, h) pixels per frame, as in those benchmarks' files.

Frames whose GT box is empty (w or h <= 0: target absent) are left out, as GOT-10k does; a missing
prediction (NaN, or an empty box) counts as IoU 0 and an infinite centre error.
"""

import numpy as np

SUCCESS_THRESHOLDS = np.linspace(0, 1, 21)  # 0:0.05:1
PRECISION_PIXELS = 20.0
NORMALISED_THRESHOLDS = np.linspace(0, 0.5, 51)  # 0:0.01:0.5


def _valid_frames(pred_xywh, gt_xywh) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred_xywh, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_xywh, dtype=np.float64).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predicted boxes for {len(gt)} frames.")
    keep = (gt[:, 2] > 0) & (gt[:, 3] > 0)
    return pred[keep], gt[keep]


def _iou_xywh(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    x0 = np.maximum(pred[:, 0], gt[:, 0])
    y0 = np.maximum(pred[:, 1], gt[:, 1])
    x1 = np.minimum(pred[:, 0] + pred[:, 2], gt[:, 0] + gt[:, 2])
    y1 = np.minimum(pred[:, 1] + pred[:, 3], gt[:, 1] + gt[:, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = np.clip(pred[:, 2], 0, None) * np.clip(pred[:, 3], 0, None) + gt[:, 2] * gt[:, 3] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, intersection / union, 0.0), nan=0.0)


def _centre_errors(pred: np.ndarray, gt: np.ndarray, normalise: bool) -> np.ndarray:
    pred_centre = pred[:, :2] + pred[:, 2:] / 2
    gt_centre = gt[:, :2] + gt[:, 2:] / 2
    delta = pred_centre - gt_centre
    if normalise:
        delta = delta / gt[:, 2:]
    errors = np.sqrt((delta**2).sum(1))
    missing = np.isnan(errors) | (pred[:, 2] <= 0) | (pred[:, 3] <= 0)
    return np.where(missing, np.inf, errors)


def tracking_metrics(pred_xywh, gt_xywh) -> dict[str, float]:
    """Per sequence (or all frames of several sequences stacked): LaSOT success AUC, precision@20 px
    and normalised precision AUC, GOT-10k AO, SR0.5 and SR0.75, all x100."""
    pred, gt = _valid_frames(pred_xywh, gt_xywh)
    if len(gt) == 0:
        raise ValueError("No frame with a visible target to evaluate.")
    iou = _iou_xywh(pred, gt)
    success = np.array([(iou > t).mean() for t in SUCCESS_THRESHOLDS])
    errors = _centre_errors(pred, gt, normalise=False)
    normalised = _centre_errors(pred, gt, normalise=True)
    return {
        "success_auc": float(success.mean() * 100),
        "precision@20": float((errors <= PRECISION_PIXELS).mean() * 100),
        "normalized_precision": float(np.mean([(normalised <= t).mean() for t in NORMALISED_THRESHOLDS]) * 100),
        "AO": float(iou.mean() * 100),
        "SR0.5": float((iou > 0.5).mean() * 100),
        "SR0.75": float((iou > 0.75).mean() * 100),
    }


def tracking_benchmark(sequences: list[tuple]) -> dict[str, float]:
    """Mean over sequences of `tracking_metrics` (LaSOT and GOT-10k average per sequence)."""
    if not sequences:
        raise ValueError("No sequences to evaluate.")
    per_sequence = [tracking_metrics(pred, gt) for pred, gt in sequences]
    return {key: float(np.mean([m[key] for m in per_sequence])) for key in per_sequence[0]}
