"""Single-object tracking metrics: LaSOT (success AUC, precision@20px, normalised precision) and
GOT-10k (AO, SR0.5, SR0.75).

Boxes are `(x, y, w, h)` in pixels, one row per frame, as in both benchmarks' files. A sequence is a
pair `(pred_boxes_xywh (n, 4), gt_boxes_xywh (n, 4))`, optionally with `visible (n,)` (LaSOT:
not full_occlusion and not out_of_view; GOT-10k: not absent / cover > 0).

LaSOT (pytracking `extract_results` / the LaSOT toolkit): frame 0 is the initialisation, so its
prediction is replaced by the GT box; a missing prediction (NaN or a zero-size box) takes the previous
frame's box, as both toolkits do; frames where the target is invisible or the GT box is empty are left
out; success(t) = fraction of frames with IoU > t for t in 0:0.05:1 and AUC = its mean; precision =
fraction with centre error <= 20 px; normalised precision = mean over t in 0:0.01:0.5 of the fraction
with the centre error divided by the GT size (per axis) <= t. Averaged over sequences.
GOT-10k (the got10k toolkit): frame 0 is skipped, frames with an invisible target are left out, and the
IoUs of all remaining frames of all sequences are pooled: AO = mean IoU, SR0.5 / SR0.75 = fraction with
IoU > 0.5 / 0.75. A missing prediction (NaN) has IoU 0.
"""

import numpy as np

LASOT_SUCCESS_THRESHOLDS = np.round(np.arange(21) * 0.05, 2)  # 0:0.05:1
LASOT_PRECISION_PIXELS = 20.0
LASOT_NORMALISED_THRESHOLDS = np.round(np.arange(51) * 0.01, 2)  # 0:0.01:0.5


def tracking_iou(pred_boxes_xywh, gt_boxes_xywh) -> np.ndarray:
    """Row-wise IoU of `(n, 4)` xywh boxes -> `(n,)` (continuous coordinates); NaN or empty gives 0."""
    pred = np.asarray(pred_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x0, y0 = np.maximum(pred[:, 0], gt[:, 0]), np.maximum(pred[:, 1], gt[:, 1])
    x1 = np.minimum(pred[:, 0] + pred[:, 2], gt[:, 0] + gt[:, 2])
    y1 = np.minimum(pred[:, 1] + pred[:, 3], gt[:, 1] + gt[:, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: np.clip(b[:, 2], 0, None) * np.clip(b[:, 3], 0, None)  # noqa: E731
    union = area(pred) + area(gt) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, intersection / union, 0.0), nan=0.0)


def _centre_error(pred: np.ndarray, gt: np.ndarray, normalise: bool) -> np.ndarray:
    delta = (pred[:, :2] + pred[:, 2:] / 2) - (gt[:, :2] + gt[:, 2:] / 2)
    if normalise:
        delta = delta / gt[:, 2:]
    return np.sqrt((delta**2).sum(axis=1))


def _unpack(sequence, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(sequence) not in (2, 3):
        raise ValueError(f"Sequence {index}: expected (pred_xywh, gt_xywh) or (pred_xywh, gt_xywh, visible).")
    pred = np.asarray(sequence[0], dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(sequence[1], dtype=np.float64).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"Sequence {index}: {len(pred)} predicted boxes for {len(gt)} GT frames.")
    if len(gt) == 0:
        raise ValueError(f"Sequence {index}: no frame.")
    visible = np.ones(len(gt), dtype=bool) if len(sequence) == 2 or sequence[2] is None else \
        np.asarray(sequence[2], dtype=bool).reshape(-1)
    if len(visible) != len(gt):
        raise ValueError(f"Sequence {index}: {len(visible)} visibility flags for {len(gt)} frames.")
    visible = visible & (gt[:, 2] > 0) & (gt[:, 3] > 0) & np.isfinite(gt).all(axis=1)
    return pred, gt, visible


def _carry_forward_missing(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Frame 0 <- GT; a NaN or zero-size prediction <- the last valid one before it (toolkit rule)."""
    pred = pred.copy()
    pred[0] = gt[0]
    valid = np.isfinite(pred).all(axis=1) & (pred[:, 2] > 0) & (pred[:, 3] > 0)
    valid[0] = True
    source = np.maximum.accumulate(np.where(valid, np.arange(len(pred)), 0))
    return pred[source]


def lasot_metrics(sequences: list) -> dict[str, float]:
    """LaSOT success AUC, precision@20 px and normalised precision (x100), averaged over sequences.

    Args:
        sequences: list of `(pred_boxes_xywh (n, 4), gt_boxes_xywh (n, 4)[, visible (n,)])`.
    Returns:
        `{"success_auc", "precision@20", "normalized_precision"}` in percent (not rounded).
    """
    if not sequences:
        raise ValueError("No sequences to evaluate.")
    success, precision, normalised = [], [], []
    for index, sequence in enumerate(sequences):
        pred, gt, visible = _unpack(sequence, index)
        pred = _carry_forward_missing(pred, gt)[visible]
        gt = gt[visible]
        if len(gt) == 0:
            raise ValueError(f"Sequence {index}: the target is never visible; nothing to evaluate.")
        iou = tracking_iou(pred, gt)
        success.append((iou[:, None] > LASOT_SUCCESS_THRESHOLDS[None, :]).mean(axis=0))
        precision.append(np.mean(_centre_error(pred, gt, normalise=False) <= LASOT_PRECISION_PIXELS))
        errors = _centre_error(pred, gt, normalise=True)
        normalised.append((errors[:, None] <= LASOT_NORMALISED_THRESHOLDS[None, :]).mean(axis=0))
    return {"success_auc": float(np.mean(success) * 100), "precision@20": float(np.mean(precision) * 100),
            "normalized_precision": float(np.mean(normalised) * 100)}


def got10k_metrics(sequences: list) -> dict[str, float]:
    """GOT-10k AO, SR0.5 and SR0.75 (x100) over the pooled frames (frame 0 skipped).

    Args:
        sequences: list of `(pred_boxes_xywh (n, 4), gt_boxes_xywh (n, 4)[, visible (n,)])`.
    Returns:
        `{"AO", "SR0.5", "SR0.75"}` in percent (not rounded).
    """
    if not sequences:
        raise ValueError("No sequences to evaluate.")
    ious = []
    for index, sequence in enumerate(sequences):
        pred, gt, visible = _unpack(sequence, index)
        keep = visible.copy()
        keep[0] = False
        ious.append(tracking_iou(pred[keep], gt[keep]))
    iou = np.concatenate(ious)
    if len(iou) == 0:
        raise ValueError("No frame after the first one has a visible target; nothing to evaluate.")
    return {"AO": float(iou.mean() * 100), "SR0.5": float(np.mean(iou > 0.5) * 100),
            "SR0.75": float(np.mean(iou > 0.75) * 100)}


def tracking_metrics(sequences: list) -> dict[str, float]:
    """Both protocols on the same sequences: `lasot_metrics` and `got10k_metrics` merged."""
    return {**lasot_metrics(sequences), **got10k_metrics(sequences)}
