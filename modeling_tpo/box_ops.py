"""Box (2-D) and span (1-D) conversions, IoU and generalised IoU.

Naming: `xyxy` boxes are (x0, y0, x1, y1); `cxcywh` boxes are (center x, center y, width,
height); spans are `se` (start, end) or `cw` (center, width). Functions named `pairwise_*`
return an (N, M) matrix; the others compare row i with row i.
"""

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou_and_union(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise IoU and union of (N, 4) xyxy boxes; an empty union gives IoU 0."""
    top_left = torch.maximum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = torch.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _box_area(boxes_a) + _box_area(boxes_b) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))
    return iou, union


def generalized_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Row-wise generalised IoU of (N, 4) xyxy boxes, in [-1, 1].

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest box enclosing both.
    """
    iou, union = box_iou_and_union(boxes_a, boxes_b)
    top_left = torch.minimum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = torch.maximum(boxes_a[..., 2:], boxes_b[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    penalty = torch.where(
        enclosing > 0,
        (enclosing - union) / enclosing.clamp(min=torch.finfo(enclosing.dtype).tiny),
        torch.zeros_like(enclosing),
    )
    return iou - penalty


def span_cw_to_se(spans: torch.Tensor) -> torch.Tensor:
    """(..., 2) (center, width) -> (..., 2) (start, end)."""
    center, width = spans.unbind(-1)
    return torch.stack([center - 0.5 * width, center + 0.5 * width], dim=-1)


def span_se_to_cw(spans: torch.Tensor) -> torch.Tensor:
    """(..., 2) (start, end) -> (..., 2) (center, width)."""
    start, end = spans.unbind(-1)
    return torch.stack([(start + end) / 2, end - start], dim=-1)


def pairwise_temporal_iou(spans_a: torch.Tensor, spans_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of every pair of (N, 2) and (M, 2) `se` spans, each (N, M)."""
    length_a = (spans_a[:, 1] - spans_a[:, 0]).clamp(min=0)
    length_b = (spans_b[:, 1] - spans_b[:, 0]).clamp(min=0)
    left = torch.maximum(spans_a[:, None, 0], spans_b[None, :, 0])
    right = torch.minimum(spans_a[:, None, 1], spans_b[None, :, 1])
    inter = (right - left).clamp(min=0)
    union = length_a[:, None] + length_b[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))
    return iou, union


def pairwise_generalized_temporal_iou(spans_a: torch.Tensor, spans_b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of every pair of (N, 2) and (M, 2) `se` spans, (N, M), in [-1, 1]."""
    iou, union = pairwise_temporal_iou(spans_a, spans_b)
    left = torch.minimum(spans_a[:, None, 0], spans_b[None, :, 0])
    right = torch.maximum(spans_a[:, None, 1], spans_b[None, :, 1])
    enclosing = (right - left).clamp(min=0)
    penalty = torch.where(
        enclosing > 0,
        (enclosing - union) / enclosing.clamp(min=torch.finfo(enclosing.dtype).tiny),
        torch.zeros_like(enclosing),
    )
    return iou - penalty


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(m, H, W) bool -> (m, 4) tight (x0, y0, x1, y1) pixel boxes (x1, y1 exclusive); zeros for an empty mask."""
    masks = masks.bool()
    m, height, width = masks.shape
    rows, cols = masks.any(2), masks.any(1)  # (m, H), (m, W)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    y0 = torch.where(rows, ys, height).min(1).values
    y1 = torch.where(rows, ys + 1, 0).max(1).values
    x0 = torch.where(cols, xs, width).min(1).values
    x1 = torch.where(cols, xs + 1, 0).max(1).values
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).float()
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))
