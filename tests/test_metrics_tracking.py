"""LaSOT and GOT-10k tracking metrics against hand-computed values, on the official toolkits' edge cases
(LaSOT MATLAB toolkit `calc_seq_err_robust.m` / pytracking `extract_results.py`; got10k toolkit)."""

import numpy as np
import pytest

from tpo.training.metrics import got10k_metrics, lasot_metrics, tracking_iou, tracking_metrics
from tpo.training.metrics.tracking import TrackingSequence, got10k_iou

BOX = [1, 1, 10, 10]  # x, y > 0: a valid GT box for the LaSOT toolkit
NAN_BOX = [np.nan] * 4
STEPS = 21  # success thresholds 0:0.05:1


def _sequence_a():
    """4 visible frames + 1 absent one. Predictions: frame 0 (replaced by GT), exact, a half-width shift
    (IoU 1/3, centre error 5 px, 0.5 of the GT size), missing, and garbage where the target is absent."""
    pred = [[50, 50, 5, 5], BOX, [6, 1, 10, 10], NAN_BOX, [90, 90, 3, 3]]
    return pred, [BOX] * 5, [True, True, True, True, False]


def test_tracking_iou_hand_cases():
    np.testing.assert_allclose(tracking_iou([BOX, [6, 1, 10, 10], [11, 1, 5, 5], NAN_BOX], [BOX] * 4), [1, 1 / 3, 0, 0])


def test_lasot_absent_frames_are_failures_not_dropped():
    # The reproducer: 4 frames, the target absent in the last, predictions exact elsewhere.
    # Official: 3 of 4 frames succeed below t = 1 -> AUC 20 * 0.75 / 21 = 71.43 (dropping the frame gave 95.24).
    out = lasot_metrics([([BOX] * 4, [BOX] * 4, [True, True, True, False])])
    assert out["success_auc"] == pytest.approx(100 * 20 * 0.75 / STEPS)
    assert round(out["success_auc"], 2) == 71.43
    assert out["precision@20"] == pytest.approx(75.0) and out["normalized_precision"] == pytest.approx(75.0)


def test_lasot_hand_computed():
    # Frames: IoU 1 (frame 0 <- GT), 1, 1/3, 1/3 (the missing box takes the previous one), absent (failure).
    # Success: IoU > t -> 4/5 for the 7 thresholds below 1/3, 2/5 for the next 13, 0 at 1.
    # Centre errors 0, 0, 5, 5 px, absent -> 4/5 within 20 px; normalised 0, 0, 0.5, 0.5 -> 2/5 within 0.20.
    out = lasot_metrics([_sequence_a()])
    assert out["success_auc"] == pytest.approx(100 * (7 * 0.8 + 13 * 0.4) / STEPS)
    assert out["precision@20"] == pytest.approx(80.0)
    assert out["normalized_precision"] == pytest.approx(40.0)


def test_lasot_first_missing_prediction_takes_the_raw_first_box_not_the_gt():
    # Frame 1 has no box: it takes frame 0's *raw* prediction (IoU 0), the toolkit fills frame 0 from GT after.
    out = lasot_metrics([([[50, 50, 5, 5], NAN_BOX], [BOX, BOX])])
    assert out["success_auc"] == pytest.approx(100 * 20 * 0.5 / STEPS)  # from GT it would be 20 / 21
    zero_width = lasot_metrics([([[50, 50, 5, 5], [1, 1, 0, 10]], [BOX, BOX])])  # w <= 0 is missing too
    assert zero_width == out


def test_lasot_invalid_gt_box_is_a_miss_for_success_and_a_hit_for_precision():
    gt = [BOX, [0, 5, 10, 10], [5, -1, 10, 10]]  # x <= 0, y <= 0: invalid frames
    out = lasot_metrics([(gt, gt)])  # predictions equal to the GT
    assert out["success_auc"] == pytest.approx(100 * 20 * (1 / 3) / STEPS)
    assert out["precision@20"] == pytest.approx(100.0) and out["normalized_precision"] == pytest.approx(100.0)


def test_lasot_normalised_precision_is_the_value_at_0_20():
    gt = [[1, 1, 20, 20]] * 3
    pred = [gt[0], [4, 1, 20, 20], [6, 1, 20, 20]]  # normalised errors 0.15 (hit), 0.25 (miss)
    out = lasot_metrics([(pred, gt)])
    assert out["normalized_precision"] == pytest.approx(100 * 2 / 3)


def test_lasot_results_longer_than_the_gt_are_trimmed_shorter_refused():
    pred, gt, visible = _sequence_a()
    assert lasot_metrics([(pred + [BOX, BOX], gt, visible)]) == lasot_metrics([_sequence_a()])
    with pytest.raises(ValueError, match="Sequence 0: 1 predicted boxes for 2 GT frames"):
        lasot_metrics([([BOX], [BOX, BOX])])


def test_lasot_precision_threshold_and_sequence_average():
    far = ([BOX, [22, 1, 10, 10]], [BOX, BOX])  # frame 1 centre error 21 px > 20
    near = ([BOX, [21, 1, 10, 10]], [BOX, BOX])  # exactly 20 px counts
    assert lasot_metrics([far])["precision@20"] == pytest.approx(50.0)
    assert lasot_metrics([near])["precision@20"] == pytest.approx(100.0)
    assert lasot_metrics([far, near])["precision@20"] == pytest.approx(75.0)  # mean over sequences


def test_got10k_skips_frame_zero_and_pools_frames():
    # Sequence A frames 1-3: IoU 1, 1/3, NaN (missing, no carry-forward) -> AO NaN, SR counts it as a failure.
    out = got10k_metrics([_sequence_a(), ([NAN_BOX, BOX], [BOX, BOX])])
    assert np.isnan(out["AO"])
    assert out["SR0.5"] == pytest.approx(50.0) and out["SR0.75"] == pytest.approx(50.0)
    pred, gt, visible = _sequence_a()
    pred[3] = [40, 40, 5, 5]  # IoU 0 instead of missing
    out = got10k_metrics([(pred, gt, visible), ([NAN_BOX, BOX], [BOX, BOX])])
    assert out["AO"] == pytest.approx(100 * (1 + 1 / 3 + 0 + 1) / 4)  # pooled, not a mean of sequence means


def test_got10k_clips_boxes_to_the_resolution():
    # A 100 x 100 frame; the GT box sticks out on the right: clipped to [90, 0, 10, 10], equal to the prediction.
    sequence = TrackingSequence(pred_xywh=[BOX, [90, 0, 10, 10]], gt_xywh=[BOX, [90, 0, 20, 10]], resolution_wh=(100, 100))
    assert got10k_metrics([sequence])["AO"] == pytest.approx(100.0)
    unclipped = TrackingSequence(pred_xywh=[BOX, [90, 0, 10, 10]], gt_xywh=[BOX, [90, 0, 20, 10]])
    assert got10k_metrics([unclipped])["AO"] == pytest.approx(50.0)
    # The toolkit clips x, y and w, h each on its own: [-5, -5, 10, 10] becomes [0, 0, 10, 10] (not 5 x 5).
    np.testing.assert_allclose(got10k_iou([[-5, -5, 10, 10]], [[0, 0, 5, 5]], (100, 100)), [0.25])


def test_got10k_pools_every_run():
    runs = [[BOX, BOX, BOX], [BOX, [50, 50, 5, 5], BOX]]  # run 1: IoU 1, 1; run 2: IoU 0, 1
    out = got10k_metrics([TrackingSequence(pred_xywh=runs, gt_xywh=[BOX] * 3)])
    assert out["AO"] == pytest.approx(75.0) and out["SR0.5"] == pytest.approx(75.0)


def test_tracking_metrics_merges_both_protocols():
    out = tracking_metrics([_sequence_a()])
    assert set(out) == {"success_auc", "precision@20", "normalized_precision", "AO", "SR0.5", "SR0.75"}
    assert out["success_auc"] == lasot_metrics([_sequence_a()])["success_auc"]


def test_bad_sequences_raise_with_the_sequence_name():
    with pytest.raises(ValueError, match="Sequence cat-1: 2 predicted boxes for 3 GT frames; GOT-10k"):
        got10k_metrics([TrackingSequence([BOX, BOX], [BOX] * 3, name="cat-1")])
    with pytest.raises(ValueError, match="Sequence 0: 1 visibility flags for 2 GT frames"):
        lasot_metrics([([BOX, BOX], [BOX, BOX], [True])])
    with pytest.raises(ValueError, match="No sequences"):
        got10k_metrics([])
