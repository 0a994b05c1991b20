"""Box (2-D) and span (1-D) conversions, IoU and generalised IoU.

Naming: `xyxy` boxes are (x0, y0, x1, y1); `cxcywh` boxes are (center x, center y, width,
height); spans are `se` (start, end) or `cw` (center, width). Functions named `pairwise_*`
return an (N, M) matrix; the others compare row i with row i.
"""

import torch

NORMALISED_TOLERANCE = 1e-4  # normalised coordinates may exceed [0, 1] by this much (rounding)


def invalid_box_rows(boxes: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the rows of (n, 4) (x0, y0, x1, y1) boxes that are not finite, ordered and within [0, 1]
    (+- NORMALISED_TOLERANCE)."""
    boxes = boxes.float()
    excess = torch.cat([boxes[:, :2] - boxes[:, 2:], (boxes - 0.5).abs() - (0.5 + NORMALISED_TOLERANCE)], dim=-1)
    return ~(excess <= 0).all(-1)  # NaN compares false: invalid


def invalid_span_rows(spans: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the rows of (n, 2) normalised (start, end) spans that break 0 <= start < end <= 1
    (+- NORMALISED_TOLERANCE) or hold NaN."""
    return ((spans[:, 0] >= spans[:, 1]) | (spans < -NORMALISED_TOLERANCE).any(-1)
            | (spans > 1 + NORMALISED_TOLERANCE).any(-1) | spans.isnan().any(-1))


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


def l1_and_giou_losses(pred_cxcywh: torch.Tensor, target_xyxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean L1 over (cx, cy, w, h), summed over coordinates, and mean (1 - GIoU) of row-paired boxes.

    pred_cxcywh (q, 4) and target_xyxy (q, 4), same floating dtype, q >= 1. Equal to

        l1 = (pred - box_xyxy_to_cxcywh(target)).abs().sum(-1).mean()
        giou = (1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), target)).mean()

    with the same gradients (ties in min / max split as autograd splits them), but as one autograd node
    with a hand-written backward: about a quarter of the ops of the composed version, which is what a
    small MLLM's step pays for (tested against the composed version). A target that requires grad takes
    the composed path.
    """
    if pred_cxcywh.shape[0] == 0 or target_xyxy.requires_grad:
        l1 = (pred_cxcywh - box_xyxy_to_cxcywh(target_xyxy)).abs().sum(-1).mean()
        return l1, (1.0 - generalized_box_iou(box_cxcywh_to_xyxy(pred_cxcywh), target_xyxy)).mean()
    return _L1GIoULoss.apply(pred_cxcywh, target_xyxy)


def _max_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d max(a, b) / d a as autograd has it: 1 where a > b, 0.5 on ties, 0 elsewhere."""
    return (a > b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)


class _L1GIoULoss(torch.autograd.Function):
    """(pred cxcywh (q, 4), target xyxy (q, 4)) -> (mean L1, mean 1 - GIoU); see `l1_and_giou_losses`."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor):
        q = pred.shape[0]
        centre, size = pred[:, :2], pred[:, 2:]
        half = 0.5 * size
        p0, p1 = centre - half, centre + half  # (q, 2) corners of the prediction
        t0, t1 = target[:, :2], target[:, 2:]
        diff = pred - torch.cat([(t0 + t1) * 0.5, t1 - t0], -1)
        # (4, q, 2) widths and heights of: intersection, enclosing box, prediction, target
        raw = torch.stack([torch.minimum(p1, t1) - torch.maximum(p0, t0), torch.maximum(p1, t1) - torch.minimum(p0, t0),
                           p1 - p0, t1 - t0])
        wh = raw.clamp(min=0)
        inter, enclosing, area_pred, area_target = wh.prod(-1).unbind(0)  # each (q,)
        union = area_pred + area_target - inter
        tiny = torch.finfo(pred.dtype).tiny
        union_c, enclosing_c = union.clamp(min=tiny), enclosing.clamp(min=tiny)
        giou = inter / union_c - (enclosing - union) / enclosing_c
        ctx.save_for_backward(diff, p0, p1, t0, t1, raw, wh, inter, enclosing, union, union_c, enclosing_c)
        return diff.abs().sum() / q, (1.0 - giou).sum() / q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_l1: torch.Tensor, grad_giou: torch.Tensor):
        diff, p0, p1, t0, t1, raw, wh, inter, enclosing, union, union_c, enclosing_c = ctx.saved_tensors
        q = diff.shape[0]
        tiny = torch.finfo(diff.dtype).tiny
        g_giou = -grad_giou / q  # d loss / d giou of each row
        # giou = inter / union_c - (enclosing - union) / enclosing_c, union = area_pred + area_target - inter
        d_union = -inter / union_c.square() * (union >= tiny) + 1.0 / enclosing_c
        d_enclosing = -1.0 / enclosing_c + (enclosing - union) / enclosing_c.square() * (enclosing >= tiny)
        d_inter = 1.0 / union_c - d_union
        g_area = torch.stack([d_inter, d_enclosing, d_union]) * g_giou  # (3, q): intersection, enclosing, pred
        g_raw = g_area[..., None] * wh[:3].flip(-1) * (raw[:3] >= 0)  # d (w * h) / d w = h; clamp passes x >= 0
        g_p1 = g_raw[0] * _max_weight(t1, p1) + g_raw[1] * _max_weight(p1, t1) + g_raw[2]
        g_p0 = -g_raw[0] * _max_weight(p0, t0) - g_raw[1] * _max_weight(t0, p0) - g_raw[2]
        grad = torch.cat([g_p0 + g_p1, 0.5 * (g_p1 - g_p0)], -1) + diff.sign() * (grad_l1 / q)
        return grad, None


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


def generalized_temporal_iou(spans_a: torch.Tensor, spans_b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of `se` spans paired by broadcasting, (..., 2) and (..., 2) -> (...): matched pairs
    as they are, every pair with `spans_a[:, None]` and `spans_b[None]`; in [-1, 1]."""
    low, high = torch.minimum(spans_a, spans_b), torch.maximum(spans_a, spans_b)  # (..., 2): of starts, of ends
    inter = (low[..., 1] - high[..., 0]).clamp(min=0)
    enclosing = (high[..., 1] - low[..., 0]).clamp(min=0)
    union = (spans_a[..., 1] - spans_a[..., 0]).clamp(min=0) + (spans_b[..., 1] - spans_b[..., 0]).clamp(min=0) - inter
    tiny = torch.finfo(union.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(union))
    penalty = torch.where(enclosing > 0, (enclosing - union) / enclosing.clamp(min=tiny), torch.zeros_like(enclosing))
    return iou - penalty


def pairwise_generalized_temporal_iou(spans_a: torch.Tensor, spans_b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of every pair of (N, 2) and (M, 2) `se` spans, (N, M), in [-1, 1]."""
    return generalized_temporal_iou(spans_a[:, None], spans_b[None])


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
