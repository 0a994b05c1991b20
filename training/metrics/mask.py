"""Segmentation metrics: gIoU / cIoU (ReasonSeg, as LISA computes them) and J&F (DAVIS protocol, as
used by MeViS and Ref-YouTube-VOS).

Masks are bool numpy arrays `(H, W)` or COCO RLE dicts `{"size": [H, W], "counts": str | bytes}`
(decoded here). A missing predicted mask is `None` and counts as an empty mask.
"""

import math

import numpy as np

from ...processing.rle import mask_from_rle, rle_from_mask

DAVIS_BOUNDARY_THRESHOLD = 0.008


def as_mask(mask, where: str = "mask") -> np.ndarray:
    """A bool `(H, W)` array from an array or a COCO RLE dict (checked: `tpo.processing.rle.check_rle`)."""
    if isinstance(mask, dict):
        return mask_from_rle(mask, where)
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{where}: a mask must be (H, W), got shape {array.shape}.")
    return array.astype(bool)


mask_to_rle = rle_from_mask  # bool `(H, W)` -> COCO RLE with a string `counts` (JSON-ready)


def mask_iou_metrics(pred_masks, gt_masks, ignore_masks=None) -> dict[str, float]:
    """ReasonSeg gIoU and cIoU (x100).

    gIoU = mean over masks of I_i / U_i, where an empty union (both masks empty) counts as 1;
    cIoU = sum_i I_i / sum_i U_i (100 if every union is empty).

    Args:
        pred_masks: per sample a mask (array or RLE) or `None` (empty).
        gt_masks: per sample a mask of the same size.
        ignore_masks: optional per sample a mask (or `None`) of pixels left out of I and U, as LISA's
            `ignore_index=255` for ReasonSeg's "ignore" polygons.
    Returns:
        `{"gIoU": %, "cIoU": %}` (not rounded).
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted masks for {len(gt_masks)} GT masks.")
    if len(gt_masks) == 0:
        raise ValueError("No masks to evaluate.")
    ignore_masks = ignore_masks if ignore_masks is not None else [None] * len(gt_masks)
    intersections, unions = np.zeros(len(gt_masks)), np.zeros(len(gt_masks))
    for index, (pred, gt, ignore) in enumerate(zip(pred_masks, gt_masks, ignore_masks)):
        gt = as_mask(gt, f"GT mask {index}")
        pred = np.zeros_like(gt) if pred is None else as_mask(pred, f"predicted mask {index}")
        if pred.shape != gt.shape:
            raise ValueError(f"Sample {index}: predicted mask of shape {pred.shape} for a GT mask of shape {gt.shape}; "
                             f"resize the prediction to the image size.")
        keep = np.ones_like(gt) if ignore is None else ~as_mask(ignore, f"ignore mask {index}")
        intersections[index] = np.count_nonzero(pred & gt & keep)
        unions[index] = np.count_nonzero((pred | gt) & keep)
    per_mask = np.divide(intersections, unions, out=np.ones_like(unions), where=unions > 0)
    total_union = unions.sum()
    return {"gIoU": float(per_mask.mean() * 100),
            "cIoU": float(intersections.sum() / total_union * 100) if total_union > 0 else 100.0}


def jaccard(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Region similarity J of one frame: IoU, 1 when both masks are empty."""
    union = np.count_nonzero(pred_mask | gt_mask)
    return 1.0 if union == 0 else np.count_nonzero(pred_mask & gt_mask) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a mask, as the DAVIS toolkit's `seg2bmap` at the mask's own size: a pixel
    is on the boundary if it differs from its right, lower or lower-right neighbour (outside the image
    counts as background, except along the last row and column, which compare only along the edge)."""
    mask = np.asarray(mask, dtype=bool)
    east, south, south_east = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    east[:, :-1] = mask[:, 1:]
    south[:-1, :] = mask[1:, :]
    south_east[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """A `(2r + 1, 2r + 1)` bool disk, `x^2 + y^2 <= r^2` (as scikit-image's `disk`)."""
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xs * xs + ys * ys <= radius * radius


def boundary_tolerance_pixels(height: int, width: int, bound_th: float = DAVIS_BOUNDARY_THRESHOLD) -> int:
    """DAVIS boundary tolerance: `bound_th` itself if >= 1, else `ceil(bound_th * sqrt(H^2 + W^2))`."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.sqrt(height * height + width * width)))


def boundary_f_measure(pred_mask: np.ndarray, gt_mask: np.ndarray, bound_th: float = DAVIS_BOUNDARY_THRESHOLD) -> float:
    """Contour accuracy F of one frame (DAVIS): boundary pixels matched within the tolerance (disk
    dilation of the other boundary). Both boundaries empty: P = R = 1 (F = 1); only the prediction's
    empty: P = 1, R = 0; only the GT's empty: P = 0, R = 1 (both F = 0)."""
    pred_mask, gt_mask = np.asarray(pred_mask, dtype=bool), np.asarray(gt_mask, dtype=bool)
    pred_boundary, gt_boundary = boundary_map(pred_mask), boundary_map(gt_mask)
    n_pred, n_gt = np.count_nonzero(pred_boundary), np.count_nonzero(gt_boundary)
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0  # (P, R) is (1, 0) or (0, 1)
    from scipy import ndimage  # here, not at module level: the scoring CLI's other metrics start without scipy

    structure = disk(boundary_tolerance_pixels(*gt_mask.shape, bound_th))
    pred_dilated = ndimage.binary_dilation(pred_boundary, structure=structure)
    gt_dilated = ndimage.binary_dilation(gt_boundary, structure=structure)
    precision = np.count_nonzero(pred_boundary & gt_dilated) / n_pred
    recall = np.count_nonzero(gt_boundary & pred_dilated) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def j_and_f(pred_videos, gt_videos) -> dict[str, float]:
    """J, F and J&F (x100): per-frame J and F averaged over the frames of an expression, then over
    expressions; J&F = (J + F) / 2.

    Args:
        pred_videos: per expression, a list of per-frame masks (array, RLE or `None` = empty), or `None`
            for an expression without any prediction: J = F = 0, as the MeViS evaluation scores the
            expressions of a video it finds no predictions for.
        gt_videos: per expression, the per-frame GT masks (all GT objects of the expression merged into
            one mask; an empty mask where the target is absent).
    Returns:
        `{"J": %, "F": %, "J&F": %}` (not rounded).
    """
    if len(pred_videos) != len(gt_videos):
        raise ValueError(f"{len(pred_videos)} predicted videos for {len(gt_videos)} expressions.")
    if len(gt_videos) == 0:
        raise ValueError("No expressions to evaluate.")
    j_scores, f_scores = np.zeros(len(gt_videos)), np.zeros(len(gt_videos))
    for index, (pred_frames, gt_frames) in enumerate(zip(pred_videos, gt_videos)):
        if len(gt_frames) == 0:
            raise ValueError(f"Expression {index}: no GT frame; every expression needs at least one frame.")
        if pred_frames is None:
            continue  # J = F = 0
        if len(pred_frames) != len(gt_frames):
            raise ValueError(f"Expression {index}: {len(pred_frames)} predicted frames for {len(gt_frames)} GT frames.")
        js, fs = [], []
        for frame, (pred, gt) in enumerate(zip(pred_frames, gt_frames)):
            gt = as_mask(gt, f"expression {index} frame {frame} GT mask")
            pred = np.zeros_like(gt) if pred is None else as_mask(pred, f"expression {index} frame {frame} predicted mask")
            if pred.shape != gt.shape:
                raise ValueError(f"Expression {index} frame {frame}: predicted mask {pred.shape} vs GT {gt.shape}.")
            js.append(jaccard(pred, gt))
            fs.append(boundary_f_measure(pred, gt))
        j_scores[index], f_scores[index] = np.mean(js), np.mean(fs)
    j, f = float(j_scores.mean() * 100), float(f_scores.mean() * 100)
    return {"J": j, "F": f, "J&F": (j + f) / 2}
