"""ReasonSeg gIoU / cIoU as a local `evaluate` module.

predictions / references: per sample a COCO RLE `{"size": [H, W], "counts": str}`; a prediction with an
empty `counts` string is missing (an empty mask). Numbers: `tpo.training.metrics.mask_iou_metrics`.
"""

import datasets
import evaluate

from tpo.training.metrics.mask import mask_iou_metrics

_RLE = {"size": datasets.Sequence(datasets.Value("int64")), "counts": datasets.Value("string")}


class MaskIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="gIoU (mean per-mask IoU, empty union = 1) and cIoU (cumulative I / cumulative U).",
            citation="Lai et al., LISA: Reasoning Segmentation via Large Language Model, CVPR 2024.",
            inputs_description="predictions / references: COCO RLE masks.",
            features=datasets.Features({"predictions": _RLE, "references": _RLE}),
        )

    def _compute(self, predictions, references):
        return mask_iou_metrics([p if p["counts"] else None for p in predictions], list(references))
