"""RefCOCO/+/g Acc@0.5 (and mIoU) as a local `evaluate` module.

predictions / references: per expression a box in pixels, `(x0, y0, x1, y1)` by default or COCO
`(x, y, w, h)` with `box_format="xywh"`; an empty prediction is wrong. Numbers:
`tpo.training.metrics.refcoco_accuracy` (percent).
"""

import datasets
import evaluate

from tpo.training.metrics.region import refcoco_accuracy
from tpo.training.metrics.region import xywh_to_xyxy


class RefCOCO(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Referring expression comprehension accuracy: IoU >= 0.5 with the GT box.",
            citation="Yu et al., Modeling Context in Referring Expressions, ECCV 2016.",
            inputs_description="predictions / references: one box per expression, pixels.",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, references, box_format: str = "xyxy", threshold: float = 0.5):
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}.")
        convert = (lambda box: xywh_to_xyxy(box)[0].tolist()) if box_format == "xywh" else list
        pred = [convert(p) if len(p) else None for p in predictions]
        gt = [convert(r) for r in references]
        return refcoco_accuracy(pred, gt, threshold=threshold)
