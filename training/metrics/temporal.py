"""Temporal IoU and Charades-STA style top-1 metrics.

Spans are `(start, end)` in seconds. The IoU of [s1, e1] and [s2, e2] is
`max(0, min(e1, e2) - max(s1, s2)) / (max(e1, e2) - min(s1, s2))`: the true union when the spans
overlap, and 0 for disjoint or touching spans (they are never merged into one). A zero-length union
gives 0. A missing prediction is a row of NaN (or `None` / an empty list where lists are accepted) and
gives IoU 0; it stays in every denominator.
"""

import numpy as np

CHARADES_IOU_THRESHOLDS = (0.3, 0.5, 0.7)


def pad_ragged(rows: list, width: int, num_columns: int, fill: float = np.nan) -> np.ndarray:
    """Stack ragged `(n_i, num_columns)` arrays into `(len(rows), max(width, 1), num_columns)`, cutting
    rows longer than `width` and filling the rest with `fill` (NaN marks "no item")."""
    out = np.full((len(rows), max(width, 1), num_columns), fill, dtype=np.float64)
    lengths = np.array([min(len(row), width) for row in rows], dtype=np.int64)
    if lengths.sum():
        # One concatenate and one fancy assignment instead of a Python loop of slice copies.
        flat = np.concatenate([np.asarray(row, dtype=np.float64).reshape(-1, num_columns)[:width] for row in rows])
        row_index = np.repeat(np.arange(len(rows)), lengths)
        column_index = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[row_index, column_index] = flat
    return out


def _iou_from_bounds(start_a, end_a, start_b, end_b) -> np.ndarray:
    intersection = np.clip(np.minimum(end_a, end_b) - np.maximum(start_a, start_b), 0, None)
    union = np.maximum(end_a, end_b) - np.minimum(start_a, start_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, 0.0)
    return np.nan_to_num(iou, nan=0.0)


def temporal_iou(pred_spans_seconds, gt_spans_seconds) -> np.ndarray:
    """Row-wise IoU of `(n, 2)` predicted and `(n, 2)` GT spans -> `(n,)`; NaN rows give 0."""
    pred = np.asarray(pred_spans_seconds, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(gt_spans_seconds, dtype=np.float64).reshape(-1, 2)
    if len(pred) != len(gt):
        raise ValueError(f"temporal_iou: {len(pred)} predicted spans for {len(gt)} GT spans.")
    return _iou_from_bounds(pred[:, 0], pred[:, 1], gt[:, 0], gt[:, 1])


def pairwise_temporal_iou(spans_a_seconds, spans_b_seconds) -> np.ndarray:
    """IoU of every span of `(n, 2)` with every span of `(m, 2)` -> `(n, m)`."""
    a = np.asarray(spans_a_seconds, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(spans_b_seconds, dtype=np.float64).reshape(-1, 2)
    return _iou_from_bounds(a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1])


def batched_pairwise_temporal_iou(spans_a_seconds: np.ndarray, spans_b_seconds: np.ndarray) -> np.ndarray:
    """Per query, IoU of every span of `(q, p, 2)` with every span of `(q, g, 2)` -> `(q, p, g)`;
    NaN (padding) rows give 0."""
    a, b = np.asarray(spans_a_seconds, dtype=np.float64), np.asarray(spans_b_seconds, dtype=np.float64)
    return _iou_from_bounds(a[:, :, None, 0], a[:, :, None, 1], b[:, None, :, 0], b[:, None, :, 1])


def _spans_or_nan(spans, what: str) -> np.ndarray:
    """A list whose items are `[start, end]`, `None` or `[]` (missing) -> `(n, 2)` with NaN rows."""
    if isinstance(spans, np.ndarray):
        return spans.astype(np.float64).reshape(-1, 2)
    rows = []
    for index, span in enumerate(spans):
        if span is None or len(span) == 0:
            rows.append((np.nan, np.nan))
        elif len(span) < 2:
            raise ValueError(f"{what} {index}: a span needs (start, end) in seconds, got {span!r}.")
        else:
            rows.append((float(span[0]), float(span[1])))
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def charades_metrics(pred_spans_seconds, gt_spans_seconds, thresholds=CHARADES_IOU_THRESHOLDS) -> dict[str, float]:
    """Charades-STA top-1 metrics: R1@m = % of ALL queries whose top-1 span has IoU >= m, mIoU = mean IoU.

    Args:
        pred_spans_seconds: `(n, 2)` top-1 predicted spans, or a list of `[start, end]` / `None`; a
            missing or unparseable prediction counts as IoU 0 (never dropped from the denominator).
        gt_spans_seconds: `(n, 2)` GT spans.
    Returns:
        `{"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}` in percent (not rounded).
    """
    pred = _spans_or_nan(pred_spans_seconds, "prediction")
    gt = np.asarray(gt_spans_seconds, dtype=np.float64).reshape(-1, 2)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions for {len(gt)} queries; give one (possibly None) per query.")
    if len(gt) == 0:
        raise ValueError("No queries to evaluate.")
    iou = temporal_iou(pred, gt)
    out = {f"R1@{t}": float(np.mean(iou >= t) * 100) for t in thresholds}
    out["mIoU"] = float(np.mean(iou) * 100)
    return out


def best_gt_iou(top1_spans_seconds, gt_windows_seconds: list) -> np.ndarray:
    """Per query, the IoU of the top-1 predicted span with the GT window it overlaps most (the
    QVHighlights R1 rule) -> `(n,)`. `top1_spans_seconds`: per query `[start, end]` or `None`;
    `gt_windows_seconds`: per query a list of `[start, end]` (possibly empty: IoU 0)."""
    pred = _spans_or_nan(top1_spans_seconds, "prediction")
    if len(pred) != len(gt_windows_seconds):
        raise ValueError(f"{len(pred)} predictions for {len(gt_windows_seconds)} queries.")
    if len(pred) == 0:
        return np.zeros(0)
    width = max(len(w) for w in gt_windows_seconds)
    gt = pad_ragged([np.asarray(w, dtype=np.float64).reshape(-1, 2) for w in gt_windows_seconds], width, 2)
    return batched_pairwise_temporal_iou(pred[:, None, :], gt)[:, 0, :].max(axis=1)
