"""Charades-STA R1@{0.3, 0.5, 0.7} and mIoU as a local `evaluate` module.

predictions: per query the top-1 span `[start, end]` in seconds (an empty list = no prediction, IoU 0);
references: per query the GT span. Numbers: `tpo.training.metrics.charades_metrics` (percent).
"""

import datasets
import evaluate

from tpo.training.metrics.temporal import charades_metrics


class CharadesSTA(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Charades-STA temporal grounding: R1@{0.3,0.5,0.7} over all queries and mIoU.",
            citation="Gao et al., TALL: Temporal Activity Localization via Language Query, ICCV 2017.",
            inputs_description="predictions / references: [start, end] in seconds per query.",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, references):
        return charades_metrics([p if len(p) else None for p in predictions], references)
