"""Task metrics, each following its benchmark's official protocol (see REFERENCE.md section 6).

All take plain numpy arrays / lists and return `dict[str, float]` in percent. The same metrics are
available as local `evaluate` modules: `evaluate.load(evaluate_module_path("qvhighlights"))`.
"""

from pathlib import Path

from .mask import boundary_f_measure, j_and_f, jaccard, mask_iou_metrics
from .mcqa import extract_option_letter, mcqa_accuracy
from .qvhighlights import gt_clip_scores, highlight_metrics, moment_retrieval_metrics, qvhighlights_metrics, to_submission
from .region import box_iou, refcoco_accuracy, xywh_to_xyxy
from .temporal import best_gt_iou, charades_metrics, pairwise_temporal_iou, temporal_iou
from .tracking import tracking_benchmark, tracking_metrics

EVALUATE_MODULES = ("qvhighlights", "charades_sta", "refcoco", "mask_iou", "davis_jf", "tracking", "mcqa")


def evaluate_module_path(name: str) -> str:
    """Folder of the local `evaluate` module `name` (load it with `evaluate.load(path)`)."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"Unknown metric {name!r}; available: {list(EVALUATE_MODULES)}.")
    return str(Path(__file__).parent / "evaluate_modules" / name)


__all__ = [
    "EVALUATE_MODULES", "best_gt_iou", "boundary_f_measure", "box_iou", "charades_metrics", "evaluate_module_path",
    "extract_option_letter", "gt_clip_scores", "highlight_metrics", "j_and_f", "jaccard", "mask_iou_metrics",
    "mcqa_accuracy", "moment_retrieval_metrics", "pairwise_temporal_iou", "qvhighlights_metrics", "refcoco_accuracy",
    "temporal_iou", "to_submission", "tracking_benchmark", "tracking_metrics", "xywh_to_xyxy",
]
