"""LaSOT and GOT-10k tracking metrics against hand-computed values."""

import numpy as np
import pytest

from tpo.training.metrics import got10k_metrics, lasot_metrics, tracking_iou, tracking_metrics

BOX = [0, 0, 10, 10]
NAN_BOX = [np.nan] * 4


def _sequence_a():
    """4 visible frames + 1 invisible one. Predictions: frame 0 (replaced by GT under LaSOT), exact, a
    half-width shift (IoU 1/3, centre error 5 px), missing, and garbage where the target is absent."""
    pred = [[50, 50, 5, 5], BOX, [5, 0, 10, 10], NAN_BOX, [90, 90, 3, 3]]
    gt = [BOX] * 5
    visible = [True, True, True, True, False]
    return pred, gt, visible


def test_tracking_iou_hand_cases():
    np.testing.assert_allclose(tracking_iou([BOX, [5, 0, 10, 10], [10, 0, 5, 5], NAN_BOX], [BOX] * 4), [1, 1 / 3, 0, 0])


def test_lasot_hand_computed():
    # LaSOT frames: IoU 1 (frame 0 <- GT), 1, 1/3, 1/3 (the missing box takes the previous one).
    # Success: IoU > t for t = 0:0.05:1 -> 1 for the 7 thresholds below 1/3, 0.5 for the next 13, 0 at 1.
    # Centre errors 0, 0, 5, 5 px; normalised 0, 0, 0.5, 0.5 -> 0.5 below t = 0.5, 1 at t = 0.5 (<=).
    out = lasot_metrics([_sequence_a()])
    assert out["success_auc"] == pytest.approx(100 * (7 * 1 + 13 * 0.5) / 21)
    assert out["precision@20"] == pytest.approx(100.0)
    assert out["normalized_precision"] == pytest.approx(100 * (50 * 0.5 + 1) / 51)


def test_lasot_precision_threshold_and_sequence_average():
    far = ([BOX, [21, 0, 10, 10]], [BOX, BOX])  # frame 1 centre error 21 px > 20
    near = ([BOX, [20, 0, 10, 10]], [BOX, BOX])  # exactly 20 px counts
    assert lasot_metrics([far])["precision@20"] == pytest.approx(50.0)
    assert lasot_metrics([near])["precision@20"] == pytest.approx(100.0)
    assert lasot_metrics([far, near])["precision@20"] == pytest.approx(75.0)  # mean over sequences


def test_empty_gt_box_marks_an_absent_target():
    pred, gt, _ = _sequence_a()
    gt = [BOX, BOX, BOX, BOX, [0, 0, 0, 0]]  # absence given by the box instead of the flag
    assert lasot_metrics([(pred, gt)]) == lasot_metrics([_sequence_a()])


def test_got10k_skips_frame_zero_and_pools_frames():
    # Sequence A frames 1-3: IoU 1, 1/3, 0 (missing, no carry-forward); sequence B frame 1: IoU 1.
    sequence_b = ([NAN_BOX, BOX], [BOX, BOX])
    out = got10k_metrics([_sequence_a(), sequence_b])
    assert out["AO"] == pytest.approx(100 * (1 + 1 / 3 + 0 + 1) / 4)  # pooled, not a mean of sequence means
    assert out["SR0.5"] == pytest.approx(50.0)
    assert out["SR0.75"] == pytest.approx(50.0)


def test_tracking_metrics_merges_both_protocols():
    out = tracking_metrics([_sequence_a()])
    assert set(out) == {"success_auc", "precision@20", "normalized_precision", "AO", "SR0.5", "SR0.75"}
    assert out["AO"] == got10k_metrics([_sequence_a()])["AO"]


def test_bad_sequences_raise_with_the_sequence_index():
    with pytest.raises(ValueError, match="Sequence 0: 1 predicted boxes for 2 GT frames"):
        lasot_metrics([([BOX], [BOX, BOX])])
    with pytest.raises(ValueError, match="Sequence 0: the target is never visible"):
        lasot_metrics([([BOX], [BOX], [False])])
    with pytest.raises(ValueError, match="No sequences"):
        got10k_metrics([])
