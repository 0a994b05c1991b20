"""Single-object tracking metrics: LaSOT (success AUC, precision@20px, normalised precision@0.20) and
GOT-10k (AO, SR0.5, SR0.75), with the official toolkits' rules for every edge case.

Boxes are `(x, y, w, h)` in pixels, one row per frame, as in both benchmarks' files. A sequence is a
`TrackingSequence`, or a tuple `(pred_boxes_xywh, gt_boxes_xywh[, visible])`.

LaSOT, as the official MATLAB toolkit (`calc_seq_err_robust.m`, `eval_tracker.m`) and pytracking
(`extract_results.py`) compute it:
- results longer than the GT are trimmed to it (LaSOT's monkey-17); shorter ones are refused;
- a prediction with NaN or a width <= 0 (or a height <= 0 where the GT row has no NaN) takes the box of
  the frame before it, from frame 1 on, *before* frame 0 is replaced: a missing box in frame 1 takes
  frame 0's raw prediction, not the GT;
- frame 0 (the initialisation) is then replaced by its GT box;
- every frame is in the denominator: a frame where the target is absent (`visible` False: LaSOT's
  full_occlusion or out_of_view) is a failure for success and for both precisions;
- a GT box with x, y, w or h <= 0 (or NaN) is an invalid frame: a failure for success (IoU -1) and a
  hit for both precisions (error -1);
- success(t) = fraction of frames with IoU > t for t in 0:0.05:1, AUC = its mean; precision = fraction
  with centre error <= 20 px; normalised precision = fraction with the centre error divided by the GT
  size (per axis) <= 0.20, the toolkit's ranking threshold (pytracking's "Norm Precision");
- curves are averaged over sequences (pytracking; the MATLAB plot script also leaves out sequences whose
  success curve is zero everywhere before averaging).
pytracking differs from the MATLAB toolkit on invalid GT boxes (it tests only w, h > 0 and counts them
as a miss for the pixel precision); the MATLAB rule is followed here. IoU and centre errors use the
toolkits' pixel conventions (`x + w - 1`, `x + (w - 1) / 2`), whose offsets cancel: they equal the
continuous-coordinate values computed here.

GOT-10k, as the got10k toolkit (`experiments/got10k.py`, `utils/metrics.rect_iou`) computes it: frame 0
is skipped; frames whose target is not visible (`cover.label` = 0) are left out; predicted and GT boxes
are clipped to the sequence's resolution (`meta_info.ini`) before the IoU, which is
`intersection / (union + eps)` clipped to [0, 1]; every run of a sequence (`<seq>_001.txt`,
`<seq>_002.txt`, ...) is pooled with every other frame of every sequence: AO = mean IoU, SR0.5 / SR0.75
= fraction with IoU > 0.5 / 0.75. No carry-forward: a NaN in a result gives a NaN IoU, so AO is NaN
(the SRs count it as a failure), as in the toolkit.
"""

from dataclasses import dataclass

import numpy as np

LASOT_SUCCESS_THRESHOLDS = np.round(np.arange(21) * 0.05, 2)  # 0:0.05:1
LASOT_PRECISION_PIXELS = 20.0
LASOT_NORMALISED_PRECISION = 0.20  # index 21 of the toolkit's 0:50 / 100
GOT10K_EPS = float(np.finfo(float).eps)  # the toolkit's `areas_inter / (areas_union + eps)`


@dataclass
class TrackingSequence:
    """One tracked sequence, pixels `(x, y, w, h)`.

    Attributes:
        pred_xywh: `(n_pred, 4)`, or `(runs, n_pred, 4)` for several runs (GOT-10k pools them; LaSOT
            takes one run).
        gt_xywh: `(n, 4)`.
        visible: `(n,)` bool, False where the target is absent (LaSOT: full_occlusion or out_of_view;
            GOT-10k: cover 0); None: visible everywhere.
        resolution_wh: `(width, height)` of the frames (GOT-10k's meta_info.ini): boxes are clipped to it.
        name: the sequence's name, for error messages.
    """

    pred_xywh: np.ndarray
    gt_xywh: np.ndarray
    visible: np.ndarray | None = None
    resolution_wh: tuple[float, float] | None = None
    name: str | None = None


def as_tracking_sequence(item, index: int) -> TrackingSequence:
    """A `TrackingSequence` from itself or a tuple `(pred_xywh, gt_xywh[, visible])`, arrays checked."""
    if isinstance(item, TrackingSequence):
        sequence = item
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        sequence = TrackingSequence(item[0], item[1], item[2] if len(item) == 3 else None)
    else:
        raise ValueError(f"Sequence {index}: expected a TrackingSequence or (pred_xywh, gt_xywh[, visible]).")
    name = sequence.name if sequence.name is not None else str(index)
    gt = np.asarray(sequence.gt_xywh, dtype=np.float64).reshape(-1, 4)
    if len(gt) == 0:
        raise ValueError(f"Sequence {name}: no GT frame.")
    pred = np.asarray(sequence.pred_xywh, dtype=np.float64)
    if pred.ndim != 3:
        pred = pred.reshape(1, -1, 4)
    if pred.shape[-1] != 4 or pred.shape[0] == 0:
        raise ValueError(f"Sequence {name}: predictions of shape {pred.shape}; expected (frames, 4) or (runs, frames, 4).")
    if sequence.visible is None:
        visible = np.ones(len(gt), dtype=bool)
    else:
        visible = np.asarray(sequence.visible, dtype=bool).reshape(-1)
        if len(visible) != len(gt):
            raise ValueError(f"Sequence {name}: {len(visible)} visibility flags for {len(gt)} GT frames.")
    resolution = None if sequence.resolution_wh is None else tuple(float(v) for v in sequence.resolution_wh)
    return TrackingSequence(pred, gt, visible, resolution, name)


def tracking_iou(pred_boxes_xywh, gt_boxes_xywh) -> np.ndarray:
    """Row-wise IoU of `(n, 4)` xywh boxes -> `(n,)` (continuous coordinates); NaN or empty gives 0."""
    pred = np.asarray(pred_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    intersection, union = _intersection_and_union(pred, gt)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, intersection / union, 0.0), nan=0.0)


def _intersection_and_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x0, y0 = np.maximum(pred[:, 0], gt[:, 0]), np.maximum(pred[:, 1], gt[:, 1])
    x1 = np.minimum(pred[:, 0] + pred[:, 2], gt[:, 0] + gt[:, 2])
    y1 = np.minimum(pred[:, 1] + pred[:, 3], gt[:, 1] + gt[:, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return intersection, pred[:, 2] * pred[:, 3] + gt[:, 2] * gt[:, 3] - intersection


def _centre_error(pred: np.ndarray, gt: np.ndarray, normalise: bool) -> np.ndarray:
    delta = (pred[:, :2] + pred[:, 2:] / 2) - (gt[:, :2] + gt[:, 2:] / 2)
    if normalise:
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = delta / gt[:, 2:]
    return np.sqrt((delta**2).sum(axis=1))


def _lasot_predictions(pred: np.ndarray, gt: np.ndarray, name: str) -> np.ndarray:
    """`(n, 4)`: trimmed to the GT, missing boxes carried forward from the raw previous box, frame 0 <- GT."""
    if len(pred) < len(gt):
        raise ValueError(f"Sequence {name}: {len(pred)} predicted boxes for {len(gt)} GT frames; LaSOT needs a box "
                         f"for every frame.")
    pred = pred[: len(gt)].copy()
    with np.errstate(invalid="ignore"):
        replace = np.isnan(pred).any(axis=1) | (pred[:, 2] <= 0) | ((pred[:, 3] <= 0) & ~np.isnan(gt).any(axis=1))
    replace[0] = False
    source = np.maximum.accumulate(np.where(replace, 0, np.arange(len(pred))))
    pred = pred[source]
    pred[0] = gt[0]
    return pred


def lasot_sequence_curves(sequence: TrackingSequence) -> tuple[np.ndarray, float, float]:
    """(success curve over LASOT_SUCCESS_THRESHOLDS, precision@20 px, normalised precision@0.20) of one
    sequence, fractions over all its frames."""
    if sequence.pred_xywh.shape[0] != 1:
        raise ValueError(f"Sequence {sequence.name}: {sequence.pred_xywh.shape[0]} runs; LaSOT scores one run.")
    gt = sequence.gt_xywh
    pred = _lasot_predictions(sequence.pred_xywh[0], gt, sequence.name)
    with np.errstate(invalid="ignore"):
        valid_gt = (gt > 0).all(axis=1)  # the MATLAB toolkit: x, y, w and h > 0
    iou = np.where(valid_gt, tracking_iou(pred, gt), -1.0)  # invalid GT: a failure
    error = np.where(valid_gt, _centre_error(pred, gt, normalise=False), -1.0)  # invalid GT: a hit
    normalised = np.where(valid_gt, _centre_error(pred, gt, normalise=True), -1.0)
    absent = ~sequence.visible  # removed from the numerators, kept in the denominator: failures
    iou[absent], error[absent], normalised[absent] = -1.0, np.inf, np.inf
    with np.errstate(invalid="ignore"):
        success = (iou[:, None] > LASOT_SUCCESS_THRESHOLDS[None, :]).mean(axis=0)
        return (success, float(np.mean(error <= LASOT_PRECISION_PIXELS)),
                float(np.mean(normalised <= LASOT_NORMALISED_PRECISION)))


def lasot_metrics(sequences: list) -> dict[str, float]:
    """LaSOT success AUC, precision@20 px and normalised precision@0.20 (x100), averaged over sequences.

    Args:
        sequences: `TrackingSequence`s or `(pred_boxes_xywh (n, 4), gt_boxes_xywh (n, 4)[, visible (n,)])`.
    Returns:
        `{"success_auc", "precision@20", "normalized_precision"}` in percent (not rounded).
    """
    if not sequences:
        raise ValueError("No sequences to evaluate.")
    success, precision, normalised = [], [], []
    for index, item in enumerate(sequences):
        curve, pixels, relative = lasot_sequence_curves(as_tracking_sequence(item, index))
        success.append(curve)
        precision.append(pixels)
        normalised.append(relative)
    return {"success_auc": float(np.mean(success) * 100), "precision@20": float(np.mean(precision) * 100),
            "normalized_precision": float(np.mean(normalised) * 100)}


def _clip_to_resolution(boxes: np.ndarray, resolution_wh: tuple[float, float]) -> np.ndarray:
    """The got10k toolkit's bound: x, y into the frame, then w, h to what is left of it."""
    width, height = resolution_wh
    boxes = boxes.copy()
    boxes[:, 0] = np.clip(boxes[:, 0], 0, width)
    boxes[:, 1] = np.clip(boxes[:, 1], 0, height)
    boxes[:, 2] = np.clip(boxes[:, 2], 0, width - boxes[:, 0])
    boxes[:, 3] = np.clip(boxes[:, 3], 0, height - boxes[:, 1])
    return boxes


def got10k_iou(pred_boxes_xywh, gt_boxes_xywh, resolution_wh: tuple[float, float] | None = None) -> np.ndarray:
    """Row-wise IoU `(n,)` as the got10k toolkit's `rect_iou`: boxes clipped to `resolution_wh` (width,
    height) when given, `intersection / (union + eps)` clipped to [0, 1]; NaN stays NaN."""
    pred = np.asarray(pred_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    if resolution_wh is not None:
        pred, gt = _clip_to_resolution(pred, resolution_wh), _clip_to_resolution(gt, resolution_wh)
    intersection, union = _intersection_and_union(pred, gt)
    return np.clip(intersection / (union + GOT10K_EPS), 0.0, 1.0)


def got10k_sequence_ious(sequence: TrackingSequence) -> np.ndarray:
    """The IoUs one sequence contributes to the pool: frames 1.. with a visible target, every run."""
    gt = sequence.gt_xywh
    runs = sequence.pred_xywh
    if runs.shape[1] != len(gt):
        raise ValueError(f"Sequence {sequence.name}: {runs.shape[1]} predicted boxes for {len(gt)} GT frames; GOT-10k "
                         f"needs exactly one box per frame.")
    keep = sequence.visible[1:]
    return np.concatenate([got10k_iou(run[1:], gt[1:], sequence.resolution_wh)[keep] for run in runs])


def got10k_metrics(sequences: list) -> dict[str, float]:
    """GOT-10k AO, SR0.5 and SR0.75 (x100) over the pooled frames (frame 0 skipped, every run pooled).

    Args:
        sequences: `TrackingSequence`s or `(pred_boxes_xywh (n, 4), gt_boxes_xywh (n, 4)[, visible (n,)])`.
    Returns:
        `{"AO", "SR0.5", "SR0.75"}` in percent (not rounded); AO is NaN when a result holds NaN.
    """
    if not sequences:
        raise ValueError("No sequences to evaluate.")
    iou = np.concatenate([got10k_sequence_ious(as_tracking_sequence(item, i)) for i, item in enumerate(sequences)])
    if len(iou) == 0:
        raise ValueError("No frame after the first one has a visible target; nothing to evaluate.")
    with np.errstate(invalid="ignore"):
        return {"AO": float(iou.mean() * 100), "SR0.5": float(np.mean(iou > 0.5) * 100),
                "SR0.75": float(np.mean(iou > 0.75) * 100)}


def tracking_metrics(sequences: list) -> dict[str, float]:
    """Both protocols on the same sequences: `lasot_metrics` and `got10k_metrics` merged."""
    return {**lasot_metrics(sequences), **got10k_metrics(sequences)}
