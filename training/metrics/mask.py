"""Segmentation metrics: gIoU / cIoU (ReasonSeg, LISA) and J&F (DAVIS protocol; MeViS, Ref-YouTube-VOS).

Masks are bool numpy arrays (H, W) or COCO RLE dicts (decoded here).
"""

import math

import numpy as np
from scipy import ndimage


def _as_mask(mask) -> np.ndarray:
    if isinstance(mask, dict):
        from pycocotools import mask as mask_utils

        counts = mask["counts"]
        encoded = {"size": list(mask["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(encoded).astype(bool)
    return np.asarray(mask).astype(bool)


def mask_iou_metrics(pred_masks, gt_masks) -> dict[str, float]:
    """gIoU = mean_i I_i / U_i (an empty union counts as 1), cIoU = sum I / sum U, both x100.
    A missing prediction (None) is an empty mask."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted masks for {len(gt_masks)} GT masks.")
    if not gt_masks:
        raise ValueError("No masks to evaluate.")
    intersections, unions, per_mask = [], [], []
    for pred, gt in zip(pred_masks, gt_masks):
        gt = _as_mask(gt)
        pred = np.zeros_like(gt) if pred is None else _as_mask(pred)
        if pred.shape != gt.shape:
            raise ValueError(f"A predicted mask of shape {pred.shape} for a GT mask of shape {gt.shape}.")
        intersection, union = float(np.logical_and(pred, gt).sum()), float(np.logical_or(pred, gt).sum())
        intersections.append(intersection)
        unions.append(union)
        per_mask.append(intersection / union if union > 0 else 1.0)
    total_union = sum(unions)
    return {"gIoU": float(np.mean(per_mask) * 100),
            "cIoU": float(sum(intersections) / total_union * 100) if total_union > 0 else 100.0}


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Region similarity J of one frame: IoU, 1 when both masks are empty."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a mask, as the DAVIS toolkit's seg2bmap at the mask's own size: pixels that
    differ from their right, lower or lower-right neighbour."""
    mask = mask.astype(bool)
    east, south, south_east = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    east[:, :-1] = mask[:, 1:]
    south[:-1, :] = mask[1:, :]
    south_east[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def _disk(radius: int) -> np.ndarray:
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xs * xs + ys * ys <= radius * radius


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Contour accuracy F of one frame (DAVIS): boundaries matched within ceil(bound_th * diagonal)
    pixels (disk dilation). Both empty: P = R = 1; only the prediction empty: P = 1, R = 0; only the
    GT empty: P = 0, R = 1."""
    height, width = gt.shape
    radius = int(math.ceil(bound_th * math.sqrt(height * height + width * width)))
    pred_boundary, gt_boundary = boundary_map(pred), boundary_map(gt)
    disk = _disk(radius)
    pred_dilated = ndimage.binary_dilation(pred_boundary, structure=disk)
    gt_dilated = ndimage.binary_dilation(gt_boundary, structure=disk)
    n_pred, n_gt = pred_boundary.sum(), gt_boundary.sum()
    if n_pred == 0 and n_gt == 0:
        precision = recall = 1.0
    elif n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = float((pred_boundary & gt_dilated).sum() / n_pred)
        recall = float((gt_boundary & pred_dilated).sum() / n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def j_and_f(pred_videos, gt_videos) -> dict[str, float]:
    """J, F and J&F (x100): per-frame J and F averaged over frames, then over expressions.

    pred_videos / gt_videos: per expression, a list of per-frame masks (all GT objects of an expression
    merged into one mask). A missing predicted frame (None) is an empty mask.
    """
    if len(pred_videos) != len(gt_videos):
        raise ValueError(f"{len(pred_videos)} predicted videos for {len(gt_videos)} expressions.")
    if not gt_videos:
        raise ValueError("No expressions to evaluate.")
    j_scores, f_scores = [], []
    for pred_frames, gt_frames in zip(pred_videos, gt_videos):
        if len(pred_frames) != len(gt_frames):
            raise ValueError(f"{len(pred_frames)} predicted frames for {len(gt_frames)} GT frames.")
        js, fs = [], []
        for pred, gt in zip(pred_frames, gt_frames):
            gt = _as_mask(gt)
            pred = np.zeros_like(gt) if pred is None else _as_mask(pred)
            js.append(jaccard(pred, gt))
            fs.append(boundary_f_measure(pred, gt))
        j_scores.append(np.mean(js))
        f_scores.append(np.mean(fs))
    j, f = float(np.mean(j_scores) * 100), float(np.mean(f_scores) * 100)
    return {"J": j, "F": f, "J&F": (j + f) / 2}
