"""Referring expression comprehension: box IoU and Acc@0.5 (RefCOCO/+/g protocol).

Acc@0.5 is scored as pycocotools' `maskUtils.iou` scores COCO `(x, y, w, h)` boxes (`bbIou`: areas
from w * h, the intersection from x + w): `refcoco_accuracy_xywh`. With non-integer coordinates that
arithmetic and the `(x0, y0, x1, y1)` one round differently, so an IoU of exactly 0.5 can fall on
either side of the threshold; `refcoco_accuracy` takes xyxy boxes, converts them to xywh and scores
them the same way. `box_iou` is the xyxy IoU (continuous coordinates, no +1) for everything else.
A missing prediction is `None`, an empty list or a row of NaN: IoU 0, wrong, and still in the
denominator.
"""

import numpy as np


def _box_area(boxes_xyxy: np.ndarray) -> np.ndarray:
    return np.clip(boxes_xyxy[..., 2] - boxes_xyxy[..., 0], 0, None) * np.clip(boxes_xyxy[..., 3] - boxes_xyxy[..., 1], 0, None)


def box_iou(pred_boxes_xyxy_pixels, gt_boxes_xyxy_pixels) -> np.ndarray:
    """Row-wise IoU of `(n, 4)` predicted and `(n, 4)` GT boxes -> `(n,)`; NaN rows give 0."""
    pred = np.asarray(pred_boxes_xyxy_pixels, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes_xyxy_pixels, dtype=np.float64).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"box_iou: {len(pred)} predicted boxes for {len(gt)} GT boxes.")
    width = np.clip(np.minimum(pred[:, 2], gt[:, 2]) - np.maximum(pred[:, 0], gt[:, 0]), 0, None)
    height = np.clip(np.minimum(pred[:, 3], gt[:, 3]) - np.maximum(pred[:, 1], gt[:, 1]), 0, None)
    intersection = width * height
    union = _box_area(pred) + _box_area(gt) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, intersection / union, 0.0), nan=0.0)


def coco_box_iou(pred_boxes_xywh_pixels, gt_boxes_xywh_pixels) -> np.ndarray:
    """Row-wise IoU `(n,)` of `(n, 4)` COCO `(x, y, w, h)` boxes, with pycocotools' `bbIou` arithmetic
    (non-crowd): no overlap along an axis gives 0, else `i / (w_p * h_p + w_g * h_g - i)`; NaN rows give 0."""
    pred = np.asarray(pred_boxes_xywh_pixels, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes_xywh_pixels, dtype=np.float64).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"coco_box_iou: {len(pred)} predicted boxes for {len(gt)} GT boxes.")
    width = np.minimum(pred[:, 2] + pred[:, 0], gt[:, 2] + gt[:, 0]) - np.maximum(pred[:, 0], gt[:, 0])
    height = np.minimum(pred[:, 3] + pred[:, 1], gt[:, 3] + gt[:, 1]) - np.maximum(pred[:, 1], gt[:, 1])
    intersection = width * height
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / (pred[:, 2] * pred[:, 3] + gt[:, 2] * gt[:, 3] - intersection)
    return np.nan_to_num(np.where((width > 0) & (height > 0), iou, 0.0), nan=0.0)


def xywh_to_xyxy(boxes_xywh) -> np.ndarray:
    """`(n, 4)` COCO `(x, y, w, h)` -> `(n, 4)` `(x0, y0, x1, y1)`, same units."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def xyxy_to_xywh(boxes_xyxy) -> np.ndarray:
    """`(n, 4)` `(x0, y0, x1, y1)` -> `(n, 4)` COCO `(x, y, w, h)`, same units."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def boxes_or_nan(boxes, what: str = "prediction") -> np.ndarray:
    """A list whose items are 4 numbers, `None` or `[]` (missing) -> `(n, 4)` with NaN rows."""
    if isinstance(boxes, np.ndarray):
        return boxes.astype(np.float64).reshape(-1, 4)
    rows = []
    for index, box in enumerate(boxes):
        if box is None or len(box) == 0:
            rows.append([np.nan] * 4)
        elif len(box) != 4:
            raise ValueError(f"{what} {index}: a box needs 4 numbers, got {box!r}.")
        else:
            rows.append([float(v) for v in box])
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def refcoco_accuracy_xywh(pred_boxes_xywh_pixels, gt_boxes_xywh_pixels, threshold: float = 0.5) -> dict[str, float]:
    """RefCOCO Acc@0.5 on COCO `(x, y, w, h)` boxes: % of expressions whose predicted box has IoU >= 0.5
    with the GT box (`coco_box_iou`, pycocotools' arithmetic); also mIoU.

    Args:
        pred_boxes_xywh_pixels: `(n, 4)` or a list of boxes / `None` (missing = wrong).
        gt_boxes_xywh_pixels: `(n, 4)`.
    Returns:
        `{"Acc@0.5": %, "mIoU": %}` (not rounded).
    """
    pred = boxes_or_nan(pred_boxes_xywh_pixels)
    gt = np.asarray(gt_boxes_xywh_pixels, dtype=np.float64).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions for {len(gt)} expressions; give one (possibly None) per expression.")
    if len(gt) == 0:
        raise ValueError("No expressions to evaluate.")
    iou = coco_box_iou(pred, gt)
    return {f"Acc@{threshold}": float(np.mean(iou >= threshold) * 100), "mIoU": float(np.mean(iou) * 100)}


def refcoco_accuracy(pred_boxes_xyxy_pixels, gt_boxes_xyxy_pixels, threshold: float = 0.5) -> dict[str, float]:
    """`refcoco_accuracy_xywh` of `(x0, y0, x1, y1)` boxes (converted to COCO xywh first): Acc@0.5 and mIoU (%)."""
    pred = boxes_or_nan(pred_boxes_xyxy_pixels)
    return refcoco_accuracy_xywh(xyxy_to_xywh(pred), xyxy_to_xywh(gt_boxes_xyxy_pixels), threshold)
