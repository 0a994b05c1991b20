"""QVHighlights moment retrieval + highlight detection as a local `evaluate` module.

    import evaluate
    from tpo.training.metrics import evaluate_module_path
    metric = evaluate.load(evaluate_module_path("qvhighlights"))
    metric.compute(predictions=[{"qid": "1", "pred_relevant_windows": [[0, 10, 0.9]], "pred_saliency_scores": [...]}],
                   references=[{"qid": "1", "duration": 150, "relevant_windows": [[0, 12]],
                                "relevant_clip_ids": [0, 1], "saliency_scores": [[4, 3, 2], [1, 2, 3]]}])

Rows are matched by qid (as strings). The numbers are `tpo.training.metrics.qvhighlights_metrics`: the
official brief keys, x100, 2 decimals. A field that is empty in EVERY row (all `pred_saliency_scores`, or
all `pred_relevant_windows`) is treated as absent, so that part of the evaluation is skipped.
"""

import datasets
import evaluate

from tpo.training.metrics.qvhighlights import qvhighlights_metrics

_FLOAT_LIST = datasets.Sequence(datasets.Value("float64"))


def _without_empty_field(rows: list[dict], field: str) -> list[dict]:
    if all(len(row.get(field) or []) == 0 for row in rows):
        return [{k: v for k, v in row.items() if k != field} for row in rows]
    return rows


class QVHighlights(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="QVHighlights moment retrieval (R1, mAP) and highlight detection (mAP, HIT@1), official protocol.",
            citation="Lei et al., QVHighlights: Detecting Moments and Highlights in Videos via Natural Language Queries, NeurIPS 2021.",
            inputs_description="predictions: submission rows; references: QVHighlights GT rows (see module docstring).",
            features=datasets.Features({
                "predictions": {"qid": datasets.Value("string"),
                                "pred_relevant_windows": datasets.Sequence(_FLOAT_LIST),
                                "pred_saliency_scores": _FLOAT_LIST},
                "references": {"qid": datasets.Value("string"), "duration": datasets.Value("float64"),
                               "relevant_windows": datasets.Sequence(_FLOAT_LIST),
                               "relevant_clip_ids": datasets.Sequence(datasets.Value("int64")),
                               "saliency_scores": datasets.Sequence(datasets.Sequence(datasets.Value("int64")))},
            }),
        )

    def _compute(self, predictions, references, on_missing: str = "error"):
        submission = _without_empty_field(_without_empty_field(list(predictions), "pred_saliency_scores"),
                                          "pred_relevant_windows")
        ground_truth = list(references)
        if "pred_saliency_scores" not in submission[0]:
            ground_truth = [{k: v for k, v in row.items() if k not in ("relevant_clip_ids", "saliency_scores")}
                            for row in ground_truth]
        return qvhighlights_metrics(submission, ground_truth, on_missing=on_missing)
