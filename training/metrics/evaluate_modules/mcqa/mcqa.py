"""Multiple-choice QA accuracy (MVBench style) as a local `evaluate` module.

predictions: the model's free-text answers ("(B) red", "B.", "The answer is B"); references: the answer
letters (or "(B) text"). Optional `options` (per question the option texts) and `groups` (per question
a task name); `convention` "tpo" (default) or "lmms-eval" (its MVBench reading of answers). Numbers:
`tpo.training.metrics.mcqa_accuracy`.
"""

import datasets
import evaluate

from tpo.training.metrics.mcqa import mcqa_accuracy


class MCQA(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy of the option letter read from free-text multiple-choice answers.",
            citation="Li et al., MVBench: A Comprehensive Multi-modal Video Understanding Benchmark, CVPR 2024.",
            inputs_description="predictions: answers as text; references: answer letters.",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, options=None, groups=None, convention="tpo"):
        return mcqa_accuracy(list(predictions), list(references), options=options, groups=groups, convention=convention)
