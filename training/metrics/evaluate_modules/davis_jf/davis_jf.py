"""J&F (DAVIS protocol; MeViS, Ref-YouTube-VOS) as a local `evaluate` module.

predictions / references: per expression the list of per-frame COCO RLE masks
`{"size": [H, W], "counts": str}` (GT objects of an expression merged); a predicted frame with an empty
`counts` string is missing (an empty mask). Numbers: `tpo.training.metrics.j_and_f`.
"""

import datasets
import evaluate

from tpo.training.metrics.mask import j_and_f

_RLE = {"size": datasets.Sequence(datasets.Value("int64")), "counts": datasets.Value("string")}


class DavisJF(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Region similarity J, contour accuracy F (boundary tolerance ceil(0.008 * diagonal)) and J&F.",
            citation="Perazzi et al., A Benchmark Dataset and Evaluation Methodology for Video Object Segmentation, CVPR 2016.",
            inputs_description="predictions / references: per expression a list of per-frame COCO RLE masks.",
            features=datasets.Features({"predictions": [_RLE], "references": [_RLE]}),
        )

    def _compute(self, predictions, references):
        pred = [[frame if frame["counts"] else None for frame in video] for video in predictions]
        return j_and_f(pred, list(references))
