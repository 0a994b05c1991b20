"""Box, mask, J&F and multiple-choice metrics against hand-computed values."""

import numpy as np
import pytest

from tpo.training.metrics import (
    boundary_f_measure,
    boundary_map,
    box_iou,
    extract_option_letter,
    j_and_f,
    jaccard,
    mask_iou_metrics,
    mask_to_rle,
    mcqa_accuracy,
    refcoco_accuracy,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from tpo.training.metrics.mask import boundary_tolerance_pixels


def _square(size, top, left, side):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


# ------------------------------------------------------------------------------------------ boxes


def test_box_iou_hand_cases():
    pred = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [np.nan] * 4]
    gt = [[5, 5, 15, 15], [10, 0, 20, 10], [0, 0, 10, 5], [0, 0, 1, 1]]
    np.testing.assert_allclose(box_iou(pred, gt), [25 / 175, 0.0, 0.5, 0.0])  # touching boxes: 0


def test_refcoco_accuracy_counts_missing_as_wrong():
    gt = [[0, 0, 10, 10]] * 3
    out = refcoco_accuracy([[0, 0, 10, 10], None, [0, 0, 10, 5]], gt)  # IoU 1, missing, exactly 0.5
    assert out == pytest.approx({"Acc@0.5": 200 / 3, "mIoU": 50.0})
    with pytest.raises(ValueError, match="prediction 0: a box needs 4 numbers"):
        refcoco_accuracy([[1, 2, 3]], [[0, 0, 1, 1]])


def test_refcoco_iou_is_pycocotools_on_xywh_boxes_ties_included():
    from pycocotools import mask as mask_utils

    from tpo.training.metrics import coco_box_iou, refcoco_accuracy_xywh

    rng = np.random.default_rng(0)
    gt = np.round(np.concatenate([rng.uniform(0, 500, (500, 2)), rng.uniform(1, 300, (500, 2))], axis=1), 2)
    pred = np.concatenate([gt[:250] * [1, 1, 0.5, 1], np.round(gt[250:] + rng.normal(0, 20, (250, 4)), 2)])
    reference = np.array([mask_utils.iou(p[None], g[None], [0])[0, 0] for p, g in zip(pred, gt)])
    assert np.array_equal(coco_box_iou(pred, gt), reference)  # the same float64 operations, in the same order
    # A half-width box is IoU 0.5 on paper; pycocotools' xywh arithmetic gives 0.4999999999999997 here,
    # the xyxy arithmetic 0.5000000000000001: the tie falls as pycocotools lets it fall (a miss).
    tie_gt, tie_pred = [[318.48, 134.89, 13.25, 5.94]], [[318.48, 134.89, 6.625, 5.94]]
    assert box_iou(xywh_to_xyxy(tie_pred), xywh_to_xyxy(tie_gt))[0] >= 0.5
    assert refcoco_accuracy_xywh(tie_pred, tie_gt)["Acc@0.5"] == 0.0


def test_box_format_round_trip():
    xywh = np.array([[10, 20, 30, 40]])
    np.testing.assert_array_equal(xywh_to_xyxy(xywh), [[10, 20, 40, 60]])
    np.testing.assert_array_equal(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh)


# ------------------------------------------------------------------------------------------ masks


def test_giou_ciou_hand_computed_with_empty_cases():
    pred_a, gt_a = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    pred_a[0, :4] = True  # 4 pixels
    gt_a[0, 2:] = True
    gt_a[1, 2:] = True  # 4 pixels, 2 shared: I = 2, U = 6
    empty = np.zeros((4, 4), bool)
    gt_c = np.zeros((4, 4), bool)
    gt_c[3, :3] = True  # 3 pixels, prediction missing: I = 0, U = 3
    out = mask_iou_metrics([pred_a, empty, None], [gt_a, empty, gt_c])
    assert out["gIoU"] == pytest.approx(100 * (2 / 6 + 1 + 0) / 3)  # both empty counts as 1
    assert out["cIoU"] == pytest.approx(100 * 2 / 9)


def test_giou_ignore_pixels_leave_intersection_and_union():
    pred, gt, ignore = np.zeros((2, 4), bool), np.zeros((2, 4), bool), np.zeros((2, 4), bool)
    pred[0, :] = True
    gt[0, :2] = True
    ignore[0, 3] = True  # one false-positive pixel is ignored: I = 2, U = 3
    assert mask_iou_metrics([pred], [gt], [ignore])["gIoU"] == pytest.approx(100 * 2 / 3)


def test_mask_metrics_accept_rle_and_reject_mismatched_sizes():
    gt = _square(20, 2, 2, 6)
    pred = _square(20, 4, 4, 6)
    assert mask_iou_metrics([mask_to_rle(pred)], [mask_to_rle(gt)]) == mask_iou_metrics([pred], [gt])
    with pytest.raises(ValueError, match="Sample 0: predicted mask of shape"):
        mask_iou_metrics([np.zeros((3, 3), bool)], [gt])


def test_boundary_map_matches_davis_seg2bmap_by_hand():
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(boundary_map(_square(4, 1, 1, 2)), expected)


def test_boundary_tolerance_formula():
    assert boundary_tolerance_pixels(100, 100) == 2  # ceil(0.008 * 141.4)
    assert boundary_tolerance_pixels(480, 854) == 8  # ceil(0.008 * 979.6)


def test_boundary_f_measure_hand_cases():
    gt = _square(100, 20, 20, 20)
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(_square(100, 20, 22, 20), gt) == 1.0  # 2 px shift: inside the tolerance
    assert boundary_f_measure(_square(100, 20, 23, 20), gt) < 0.6  # 3 px: the vertical edges no longer match
    assert boundary_f_measure(_square(100, 20, 60, 20), gt) == 0.0  # far away: P = R = 0
    # Prediction = GT plus an equal square far away: P = 1/2 (half its boundary matches), R = 1 -> F = 2/3.
    assert boundary_f_measure(gt | _square(100, 60, 60, 20), gt) == pytest.approx(2 / 3)


def test_boundary_f_measure_empty_rules():
    empty = np.zeros((30, 30), bool)
    square = _square(30, 5, 5, 10)
    assert boundary_f_measure(empty, empty) == 1.0  # P = R = 1
    assert boundary_f_measure(empty, square) == 0.0  # P = 1, R = 0
    assert boundary_f_measure(square, empty) == 0.0  # P = 0, R = 1


def test_j_and_f_averages_frames_then_expressions():
    empty = np.zeros((30, 30), bool)
    square = _square(30, 5, 5, 10)
    # Expression 1: frame 0 both empty (J = F = 1), frame 1 prediction missing (J = F = 0): 0.5 each.
    # Expression 2: perfect (1). Mean over expressions: 0.75.
    out = j_and_f([[empty, None], [square]], [[empty, square], [square]])
    assert out == pytest.approx({"J": 75.0, "F": 75.0, "J&F": 75.0})
    assert jaccard(empty, empty) == 1.0


def test_j_and_f_rejects_expression_without_frames_or_frame_count_mismatch():
    with pytest.raises(ValueError, match="Expression 0: no GT frame"):
        j_and_f([[]], [[]])
    with pytest.raises(ValueError, match="Expression 0: 1 predicted frames for 2 GT frames"):
        j_and_f([[None]], [[np.zeros((2, 2), bool)] * 2])


# ------------------------------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize("text, letter", [
    ("(B) red", "B"), ("B.", "B"), ("B", "B"), ("C) a dog", "C"), ("The answer is B", "B"), ("Answer: (C)", "C"),
    ("Best option: (D) the blue one", "D"), ("I think it is (A) because", "A"), ("  [B]", "B"),
])
def test_extract_option_letter_formats(text, letter):
    assert extract_option_letter(text) == letter


def test_extract_option_letter_does_not_read_words_as_letters():
    options = ["cat", "dog", "bird", "fish"]
    assert extract_option_letter("A man is running") is None
    assert extract_option_letter("the answer is a dog", options) == "B"  # lowercase "a" is a word; "dog" is option B
    assert extract_option_letter("red", ["blue", "red"]) == "B"
    assert extract_option_letter("E", options) is None  # only A-D exist
    assert extract_option_letter("cat or dog", options) is None  # two options named: cannot tell


def test_mcqa_accuracy_with_groups_and_unparsed():
    out = mcqa_accuracy(["(A) x", "B", "no idea", "(C)"], ["A", "(C) y", "B", 2], groups=["t1", "t1", "t2", "t2"])
    # correct: yes, no (B vs C), unparsed, yes (index 2 = C)
    assert out == pytest.approx({"accuracy": 50.0, "unparsed": 25.0, "accuracy/t1": 50.0, "accuracy/t2": 50.0,
                                 "mean_group_accuracy": 50.0})
    with pytest.raises(ValueError, match="Question 0: cannot read an option letter"):
        mcqa_accuracy(["A"], ["banana"])


# The documented differences from lmms-eval's MVBench reading (answer, letter here, letter under lmms-eval).
LMMS_EVAL_DIFFERENCES = [
    ("a", None, "A"),
    ("(b)", None, "B"),
    ("A person is running", None, "A"),
    ("d. none of them", None, "D"),
    ("F", "F", None),  # 6 options; lmms-eval reads A-E only
    ("red", "B", None),  # an option's text
    ("B", "B", "B"),
    ("The answer is (C).", "C", "C"),
]


@pytest.mark.parametrize("text,ours,lmms", LMMS_EVAL_DIFFERENCES)
def test_answer_conventions_differ_where_documented(text, ours, lmms):
    from tpo.training.metrics.mcqa import lmms_eval_option_letter

    options = ["blue", "red", "green", "bird", "cat", "dog"]
    assert extract_option_letter(text, options) == ours
    assert lmms_eval_option_letter(text, options) == lmms


def test_mcqa_lmms_eval_convention_drops_empty_answers():
    predictions, answers = ["a", "", "A person walks", "C", None], ["A", "B", "A", "D", "A"]
    ours = mcqa_accuracy(predictions, answers)
    assert ours == pytest.approx({"accuracy": 0.0, "unparsed": 80.0})  # "C" is wrong, the rest unread
    lmms = mcqa_accuracy(predictions, answers, convention="lmms-eval", groups=["g1", "g2", "g1", "g1", "g1"])
    # "" leaves the denominator (and g2 with it); of 4: "a" right, "A person" right, "C" wrong, None wrong
    assert lmms == pytest.approx({"accuracy": 50.0, "unparsed": 25.0, "empty": 20.0, "accuracy/g1": 50.0,
                                  "mean_group_accuracy": 50.0})
    with pytest.raises(ValueError, match="Unknown answer convention 'lmms'"):
        mcqa_accuracy(["A"], ["A"], convention="lmms")
