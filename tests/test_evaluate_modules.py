"""The local `evaluate` modules give the same numbers as the metric functions."""

import math

import evaluate
import numpy as np
import pytest

from tpo.training.metrics import (
    EVALUATE_MODULES,
    charades_metrics,
    evaluate_module_path,
    j_and_f,
    mask_iou_metrics,
    mask_to_rle,
    mcqa_accuracy,
    qvhighlights_metrics,
    refcoco_accuracy,
    tracking_metrics,
    xywh_to_xyxy,
)


def _load(name):
    return evaluate.load(evaluate_module_path(name))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) if isinstance(a[k], float) and math.isnan(a[k]) else a[k] == b[k] for k in a)


def test_every_module_loads_offline():
    for name in EVALUATE_MODULES:
        assert isinstance(_load(name), evaluate.Metric)
    with pytest.raises(ValueError, match="Unknown metric 'bleu'"):
        evaluate_module_path("bleu")


def test_qvhighlights_module_equals_function():
    rng = np.random.default_rng(0)
    predictions, references = [], []
    for qid in range(12):
        start = float(rng.integers(0, 60)) * 2
        references.append({"qid": str(qid), "duration": 150.0, "relevant_windows": [[start, start + 20.0], [130.0, 136.0]],
                           "relevant_clip_ids": [int(start // 2), 65], "saliency_scores": [[4, 2, 3], [1, 0, 4]]})
        windows = [[float(start + rng.normal(0, 3)), float(start + 20 + rng.normal(0, 3)), float(rng.random())] for _ in range(5)]
        predictions.append({"qid": str(qid), "pred_relevant_windows": windows,
                            "pred_saliency_scores": np.round(rng.random(75), 1).tolist()})
    module = _load("qvhighlights").compute(predictions=predictions, references=references)
    assert _same(module, qvhighlights_metrics(predictions, references))
    assert "HL-min-VeryGood-mAP" in module and "MR-full-mAP" in module


def test_qvhighlights_module_skips_highlights_when_no_row_has_scores():
    predictions = [{"qid": "a", "pred_relevant_windows": [[0, 10, 1.0]], "pred_saliency_scores": []}]
    references = [{"qid": "a", "duration": 20.0, "relevant_windows": [[0, 10]], "relevant_clip_ids": [], "saliency_scores": []}]
    module = _load("qvhighlights").compute(predictions=predictions, references=references)
    assert module["MR-full-mAP"] == 100.0 and not any(k.startswith("HL") for k in module)


def test_charades_and_refcoco_modules_equal_functions():
    pred, gt = [[0.0, 5.0], [], [2.0, 9.0]], [[0.0, 5.0], [1.0, 3.0], [3.0, 8.0]]
    module = _load("charades_sta").compute(predictions=pred, references=gt)
    assert module == charades_metrics([[0.0, 5.0], None, [2.0, 9.0]], gt)
    boxes_xywh, gt_xywh = [[0, 0, 10, 10], [], [5, 5, 10, 10]], [[0, 0, 10, 10], [0, 0, 4, 4], [0, 0, 10, 10]]
    module = _load("refcoco").compute(predictions=boxes_xywh, references=gt_xywh, box_format="xywh")
    expected = refcoco_accuracy([xywh_to_xyxy(boxes_xywh[0])[0], None, xywh_to_xyxy(boxes_xywh[2])[0]], xywh_to_xyxy(gt_xywh))
    assert module == expected


def test_mask_modules_equal_functions():
    rng = np.random.default_rng(1)
    masks = [rng.random((16, 20)) > 0.6 for _ in range(6)]
    gts = [rng.random((16, 20)) > 0.5 for _ in range(6)]
    pred_rles = [mask_to_rle(m) for m in masks]
    pred_rles[2] = {"size": [16, 20], "counts": ""}  # missing
    module = _load("mask_iou").compute(predictions=pred_rles, references=[mask_to_rle(g) for g in gts])
    assert module == mask_iou_metrics([masks[0], masks[1], None] + masks[3:], gts)
    videos_pred = [pred_rles[:3], pred_rles[3:]]
    videos_gt = [[mask_to_rle(g) for g in gts[:3]], [mask_to_rle(g) for g in gts[3:]]]
    module = _load("davis_jf").compute(predictions=videos_pred, references=videos_gt)
    assert module == j_and_f([[masks[0], masks[1], None], masks[3:]], [gts[:3], gts[3:]])


def test_tracking_and_mcqa_modules_equal_functions():
    gt = [[[0, 0, 10, 10]] * 4, [[5, 5, 20, 20]] * 3]
    pred = [[[0, 0, 10, 10], [1, 0, 10, 10], [4, 2, 10, 10], [30, 30, 5, 5]], [[5, 5, 20, 20], [9, 5, 20, 20], [5, 5, 8, 8]]]
    module = _load("tracking").compute(predictions=pred, references=gt)
    assert module == tracking_metrics(list(zip(pred, gt)))
    answers = ["(B) red", "The answer is C", "A.", "dunno"]
    module = _load("mcqa").compute(predictions=answers, references=["B", "C", "D", "A"], groups=["x", "x", "y", "y"])
    assert module == mcqa_accuracy(answers, ["B", "C", "D", "A"], groups=["x", "x", "y", "y"])
    assert module["accuracy"] == 50.0
