"""Referring expression comprehension: box IoU and Acc@0.5 (RefCOCO protocol)."""

import numpy as np


def box_iou(pred_xyxy, gt_xyxy) -> np.ndarray:
    """Row-wise IoU of (n, 4) pixel boxes (x0, y0, x1, y1); a NaN (missing) prediction gives 0."""
    pred = np.asarray(pred_xyxy, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_xyxy, dtype=np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(pred[:, 2], gt[:, 2]) - np.maximum(pred[:, 0], gt[:, 0]), 0, None)
    height = np.clip(np.minimum(pred[:, 3], gt[:, 3]) - np.maximum(pred[:, 1], gt[:, 1]), 0, None)
    intersection = width * height
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    union = area(pred) + area(gt) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, intersection / union, 0.0), nan=0.0)


def xywh_to_xyxy(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def refcoco_accuracy(pred_boxes_xyxy, gt_boxes_xyxy, threshold: float = 0.5) -> dict[str, float]:
    """Acc@0.5: the fraction (x100) of expressions whose predicted box has IoU >= 0.5 with the GT box.
    A missing prediction (None, or a row of NaN) is wrong; it stays in the denominator. Also mIoU."""
    pred = np.array([[np.nan] * 4 if p is None else p for p in pred_boxes_xyxy], dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions for {len(gt)} expressions; give one (possibly None) per expression.")
    if len(gt) == 0:
        raise ValueError("No expressions to evaluate.")
    iou = box_iou(pred, gt)
    return {f"Acc@{threshold}": float(np.mean(iou >= threshold) * 100), "mIoU": float(np.mean(iou) * 100)}
