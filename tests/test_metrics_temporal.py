"""Temporal IoU and Charades-STA metrics against hand-computed values."""

import numpy as np
import pytest

from tpo.training.metrics import best_gt_iou, charades_metrics, pairwise_temporal_iou, temporal_iou
from tpo.training.metrics.temporal import batched_pairwise_temporal_iou, pad_ragged


def test_temporal_iou_hand_cases():
    pred = [[0, 10], [0, 10], [10, 20], [0, 5], [2, 4], [0, 10]]
    gt = [[5, 15], [0, 10], [0, 10], [6, 9], [0, 10], [0, 0]]
    # overlap 5 / union 15; identical; touching (0, not merged); disjoint; contained 2/10; empty union-free GT
    expected = [5 / 15, 1.0, 0.0, 0.0, 0.2, 0.0]
    np.testing.assert_allclose(temporal_iou(pred, gt), expected)


def test_temporal_iou_missing_prediction_is_zero():
    np.testing.assert_allclose(temporal_iou([[np.nan, np.nan], [1, 3]], [[0, 2], [1, 3]]), [0.0, 1.0])


def test_temporal_iou_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predicted spans for 1 GT"):
        temporal_iou([[0, 1], [1, 2]], [[0, 1]])


def test_pairwise_and_batched_iou_agree_with_rowwise():
    rng = np.random.default_rng(0)
    a = np.sort(rng.uniform(0, 50, (5, 2)), axis=1)
    b = np.sort(rng.uniform(0, 50, (3, 2)), axis=1)
    matrix = pairwise_temporal_iou(a, b)
    assert matrix.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            assert matrix[i, j] == pytest.approx(temporal_iou(a[i], b[j])[0])
    batched = batched_pairwise_temporal_iou(a[None], b[None])
    np.testing.assert_allclose(batched[0], matrix)


def test_pad_ragged_places_rows_and_fills():
    out = pad_ragged([np.array([[1, 2], [3, 4], [5, 6]]), np.zeros((0, 2)), np.array([[7, 8]])], 2, 2)
    assert out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out[0], [[1, 2], [3, 4]])  # cut at width 2
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[2, 0], [7, 8])
    assert np.isnan(out[2, 1]).all()


def test_charades_metrics_hand_computed_with_missing_prediction():
    pred = [[0, 10], [0, 10], None, [12, 20]]
    gt = [[0, 10], [4, 10], [0, 5], [0, 10]]
    # IoUs: 1.0, 0.6, 0 (missing, still counted), 0 (disjoint)
    out = charades_metrics(pred, gt)
    assert out == pytest.approx({"R1@0.3": 50.0, "R1@0.5": 50.0, "R1@0.7": 25.0, "mIoU": 40.0})


def test_charades_threshold_is_inclusive():
    # IoU exactly 0.5 counts for R1@0.5 (>=).
    assert charades_metrics([[0, 5]], [[0, 10]])["R1@0.5"] == 100.0


def test_charades_empty_list_is_missing_and_bad_span_raises():
    assert charades_metrics([[]], [[0, 1]])["mIoU"] == 0.0
    with pytest.raises(ValueError, match="prediction 0"):
        charades_metrics([[3]], [[0, 1]])
    with pytest.raises(ValueError, match="1 predictions for 2 queries"):
        charades_metrics([[0, 1]], [[0, 1], [1, 2]])


def test_best_gt_iou_several_windows_and_missing():
    top1 = [[0, 10], None, [20, 30]]
    gt_windows = [[[50, 60], [0, 8], [5, 10]], [[0, 4]], []]
    # query 0: best of (0, 0.8, 0.5); query 1: no prediction; query 2: no GT window
    np.testing.assert_allclose(best_gt_iou(top1, gt_windows), [0.8, 0.0, 0.0])
