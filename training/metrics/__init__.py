"""Task metrics, each following its benchmark's official protocol (see REFERENCE.md section 6).

The functions take plain numpy arrays / lists and return `dict[str, float]` in percent, so they fit a
Trainer's `compute_metrics`. Units: spans `(start, end)` in seconds; boxes `(x0, y0, x1, y1)` pixels
for RefCOCO and `(x, y, w, h)` pixels for tracking; masks bool `(H, W)` arrays or COCO RLE.
The same metrics are local `evaluate` modules: `evaluate.load(evaluate_module_path("qvhighlights"))`.
"""

from pathlib import Path

from .mask import as_mask, boundary_f_measure, boundary_map, j_and_f, jaccard, mask_iou_metrics, mask_to_rle
from .mcqa import extract_option_letter, mcqa_accuracy
from .qvhighlights import (
    gt_clip_scores,
    highlight_metrics,
    moment_retrieval_metrics,
    predictions_to_submission,
    qvhighlights_eval,
    qvhighlights_metrics,
    to_submission,
)
from .region import box_iou, coco_box_iou, refcoco_accuracy, refcoco_accuracy_xywh, xywh_to_xyxy, xyxy_to_xywh
from .temporal import batched_pairwise_temporal_iou, best_gt_iou, charades_metrics, pairwise_temporal_iou, temporal_iou
from .tracking import got10k_metrics, lasot_metrics, tracking_iou, tracking_metrics

EVALUATE_MODULES = ("qvhighlights", "charades_sta", "refcoco", "mask_iou", "davis_jf", "tracking", "mcqa")


def evaluate_module_path(name: str) -> str:
    """The folder of the local `evaluate` module `name`; load it with `evaluate.load(path)`."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"Unknown metric {name!r}; available: {list(EVALUATE_MODULES)}.")
    return str(Path(__file__).parent / "evaluate_modules" / name)


__all__ = [
    "EVALUATE_MODULES", "as_mask", "batched_pairwise_temporal_iou", "best_gt_iou", "boundary_f_measure", "boundary_map",
    "box_iou", "charades_metrics", "coco_box_iou", "evaluate_module_path", "extract_option_letter", "got10k_metrics", "gt_clip_scores",
    "highlight_metrics", "j_and_f", "jaccard", "lasot_metrics", "mask_iou_metrics", "mask_to_rle", "mcqa_accuracy",
    "moment_retrieval_metrics", "pairwise_temporal_iou", "predictions_to_submission", "qvhighlights_eval",
    "qvhighlights_metrics", "refcoco_accuracy", "refcoco_accuracy_xywh", "temporal_iou", "to_submission", "tracking_iou", "tracking_metrics",
    "xywh_to_xyxy", "xyxy_to_xywh",
]
