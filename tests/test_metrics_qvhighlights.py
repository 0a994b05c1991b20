"""QVHighlights official protocol against hand-computed cases (and a per-query loop on random data)."""


import numpy as np
import pytest

from script_loader import load_script
from tpo.training.metrics import (
    gt_clip_scores,
    highlight_metrics,
    moment_retrieval_metrics,
    predictions_to_submission,
    qvhighlights_eval,
    qvhighlights_metrics,
    to_submission,
)

OFFICIAL_BRIEF_KEYS = {
    "MR-full-mAP", "MR-full-mAP@0.5", "MR-full-mAP@0.75", "MR-short-mAP", "MR-middle-mAP", "MR-long-mAP",
    "MR-full-R1@0.5", "MR-full-R1@0.7", "HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP",
    "HL-min-Good-Hit1", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1",
}


def _gt(qid, windows, duration=150.0, clip_ids=(), scores=()):
    return {"qid": qid, "duration": duration, "relevant_windows": windows, "relevant_clip_ids": list(clip_ids),
            "saliency_scores": [list(s) for s in scores]}


@pytest.fixture
def two_queries():
    submission = [{"qid": 1, "pred_relevant_windows": [[0, 10, 0.9], [20, 30, 0.5]], "pred_saliency_scores": [0.1, 0.5, 0.2, 0, 0]},
                  {"qid": 2, "pred_relevant_windows": [[5, 8, 0.3]], "pred_saliency_scores": [1, 1, 1]}]
    ground_truth = [_gt(1, [[0, 10], [20, 40]], 10, [0, 1], [[4, 4, 2], [1, 3, 4]]),
                    _gt(2, [[4, 8]], 8, [2], [[4, 4, 4]])]
    return submission, ground_truth


def test_hand_computed_moment_retrieval(two_queries):
    # Query 1: IoUs 1 and 0.5 with its two GT windows -> AP 1 at t = 0.5, 0.5 above. Query 2: IoU 0.75
    # -> AP 1 up to t = 0.75, 0 above. Mean over queries per threshold, then over thresholds.
    result = qvhighlights_eval(*two_queries)
    full = result["full"]["MR-mAP"]
    assert full["0.5"] == 100.0 and full["0.55"] == 75.0 and full["0.75"] == 75.0 and full["0.8"] == 25.0
    assert full["average"] == pytest.approx((100 + 5 * 75 + 4 * 25) / 10)
    assert result["full"]["MR-R1"]["0.75"] == 100.0 and result["full"]["MR-R1"]["0.8"] == 50.0
    # Buckets keep only the GT windows in range: short = [0, 10] and [4, 8]; middle = [20, 40] of query 1.
    assert result["short"]["MR-mAP"]["average"] == pytest.approx((6 * 100 + 4 * 50) / 10)
    assert result["middle"]["MR-mAP"]["0.5"] == 50.0  # FP (IoU 0) then TP: precision 1/2 at recall 1
    assert result["middle"]["MR-R1"]["0.5"] == 0.0  # the first window misses [20, 40]
    assert np.isnan(result["long"]["MR-mAP"]["average"])  # no query: NaN, never a fake 0


def test_hand_computed_highlight_detection(two_queries):
    # Query 1 (5 clips, scores .1 .5 .2 0 0): Fair labels per annotator [1,0,0,0,0], [1,1,0,0,0], [1,1,0,0,0]
    # -> AP 1/3, 5/6, 5/6. Query 2 (4 clips, three tied scores then a padded 0): AP 1/3 for everyone.
    brief = qvhighlights_metrics(*two_queries)
    assert brief["HL-min-Fair-mAP"] == pytest.approx(round(100 * ((1 / 3 + 5 / 6 + 5 / 6) / 3 + 1 / 3) / 2, 2))
    assert brief["HL-min-Good-mAP"] == round(100 * ((1 / 3 + 5 / 6 + 1) / 3 + 1 / 3) / 2, 2)  # 52.78
    # Hit@1: query 1's top clip (1) is positive for some annotator; query 2's argmax is clip 0 (first tie).
    assert brief["HL-min-Fair-Hit1"] == 50.0 and brief["HL-min-VeryGood-Hit1"] == 50.0


def test_output_keys_exactly_official(two_queries):
    result = qvhighlights_eval(*two_queries)
    assert set(result["brief"]) == OFFICIAL_BRIEF_KEYS
    assert list(result) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood", "full", "long", "middle", "short"]
    assert set(result["full"]["MR-mAP"]) == {"0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95", "average"}
    flat = qvhighlights_metrics(*two_queries)
    assert all(isinstance(v, float) for v in flat.values())
    assert {k: v for k, v in flat.items() if k != "MR-long-mAP"} == {k: v for k, v in result["brief"].items() if k != "MR-long-mAP"}


def test_greedy_matching_locks_matched_windows():
    # p2 overlaps g1 by 0.9 but g1 is taken by p1: false positive. precision 1, 1/2, 2/3 at recall
    # 1/2, 1/2, 1 -> interpolated AP = 1/2 * 1 + 1/2 * 2/3 = 5/6 at every threshold.
    metrics = moment_retrieval_metrics([[[0, 10, 0.9], [0, 9, 0.8], [20, 30, 0.7]]], [[[0, 10], [20, 30]]])
    assert metrics["MR-mAP"]["average"] == 83.33
    assert metrics["MR-mAP"]["0.95"] == 83.33


def test_tied_iou_locks_the_later_gt_window_as_official():
    # p1 = [5, 10] has IoU 0.5 with both GT windows; the official loop takes the later one, so p2 = [0, 10]
    # can still match [0, 10]: AP 1 at t = 0.5 (it would be 0.5 if p1 took the first window).
    metrics = moment_retrieval_metrics([[[5, 10, 0.9], [0, 10, 0.8]]], [[[0, 10], [5, 15]]])
    assert metrics["MR-mAP"]["0.5"] == 100.0
    assert metrics["MR-mAP"]["0.55"] == 25.0  # p1 misses; p2 TP at rank 2: precision 1/2 at recall 1/2


def test_only_first_ten_submitted_windows_count_and_r1_uses_the_first():
    wrong = [[100 + i, 101 + i, 0.1] for i in range(10)]
    metrics = moment_retrieval_metrics([wrong + [[0, 10, 0.99]]], [[[0, 10]]])
    assert metrics["MR-mAP"]["average"] == 0.0  # the 11th window is cut before sorting by score
    unsorted = moment_retrieval_metrics([[[50, 60, 0.1], [0, 10, 0.9]]], [[[0, 10]]])
    assert unsorted["MR-mAP"]["average"] == 100.0  # AP sorts by score
    assert unsorted["MR-R1"]["0.5"] == 0.0  # R1 takes pred_relevant_windows[0]


def test_no_prediction_is_wrong_and_stays_in_the_denominator():
    metrics = moment_retrieval_metrics([[], [[0, 10, 0.5]]], [[[0, 10]], [[0, 10]]])
    assert metrics["MR-mAP"]["average"] == 50.0
    assert metrics["MR-R1"]["0.7"] == 50.0


def test_touching_windows_do_not_match():
    metrics = moment_retrieval_metrics([[[10, 20, 0.9]]], [[[0, 10], [20, 30]]])
    assert metrics["MR-mAP"]["0.5"] == 0.0 and metrics["MR-R1"]["0.5"] == 0.0


def test_all_zero_saliency_prediction_gives_the_positive_rate():
    # 4 clips, one positive: all scores tied -> one precision-recall point, precision 1/4. argmax = clip 0: miss.
    out = highlight_metrics([[0, 0, 0, 0]], [np.array([[0, 0, 0], [4, 4, 4], [0, 0, 0], [0, 0, 0]])])
    assert out["HL-min-Fair"] == {"HL-mAP": 25.0, "HL-Hit1": 0.0}


def test_tied_scores_enter_together():
    # Scores .5 .5 .1 with labels 1 0 1: the tied pair is one point (precision 1/2, recall 1/2), then 2/3
    # at recall 1; interpolation lifts the first to 2/3 -> AP 2/3 (per-clip ranking would give 5/6).
    gt = np.array([[4, 0, 0], [0, 0, 0], [4, 0, 0]])
    out = highlight_metrics([[0.5, 0.5, 0.1]], [gt])
    # Annotator 1: AP 2/3; annotators 2 and 3 have no positive clip: AP 0.
    assert out["HL-min-Fair"]["HL-mAP"] == round(100 * (2 / 3) / 3, 2)


def test_all_positive_all_negative_and_hit_outside_the_video():
    all_positive = np.full((3, 3), 4)
    all_negative = np.full((3, 3), 1)
    out = highlight_metrics([[0.1, 0.9, 0.3], [0.1, 0.2, 0.3]], [all_positive, all_negative])
    assert out["HL-min-Fair"]["HL-mAP"] == 50.0  # AP 1 for every annotator of query 1, 0 for query 2
    # The argmax (index 4) lies past the 3 clips of the video: a miss, although every clip is positive.
    assert highlight_metrics([[0, 0, 0, 0, 1]], [all_positive])["HL-min-Fair"]["HL-Hit1"] == 0.0


def test_empty_saliency_prediction_is_wrong():
    out = highlight_metrics([[]], [np.full((3, 3), 4)])
    assert out["HL-min-Fair"] == {"HL-mAP": 0.0, "HL-Hit1": 0.0}


def test_num_clips_is_floor_of_duration_over_two_and_bad_clips():
    scores = gt_clip_scores({"duration": 9, "relevant_clip_ids": [3], "saliency_scores": [[1, 2, 3]]})
    np.testing.assert_array_equal(scores, [[0, 0, 0]] * 3 + [[1, 2, 3]])  # int(9 / 2) = 4 clips
    # A clip past the end (a probed duration slightly short) extends the video instead of crashing.
    assert gt_clip_scores({"duration": 9, "relevant_clip_ids": [4], "saliency_scores": [[1, 2, 3]]}).shape == (5, 3)
    with pytest.raises(ValueError, match="qid 7: 2 relevant_clip_ids for 1 saliency_scores rows"):
        gt_clip_scores({"qid": 7, "duration": 9, "relevant_clip_ids": [1, 2], "saliency_scores": [[1, 2, 3]]})


def test_missing_qids_error_wrong_and_drop():
    ground_truth = [_gt("a", [[0, 10]]), _gt("b", [[0, 10]])]
    submission = [{"qid": "a", "pred_relevant_windows": [[0, 10, 1.0]]}]
    with pytest.raises(ValueError, match=r"1 GT qid\(s\) without prediction \(e.g. \['b'\]\)"):
        qvhighlights_metrics(submission, ground_truth)
    assert qvhighlights_metrics(submission, ground_truth, on_missing="wrong")["MR-full-mAP"] == 50.0
    assert qvhighlights_metrics(submission, ground_truth, on_missing="drop")["MR-full-mAP"] == 100.0
    assert "HL-min-Fair-mAP" not in qvhighlights_metrics(submission, ground_truth, on_missing="drop")


def test_bad_input_names_the_query():
    with pytest.raises(ValueError, match="qid 'x': pred_relevant_windows must be"):
        qvhighlights_metrics([{"qid": "x", "pred_relevant_windows": [[0, 1]]}], [_gt("x", [[0, 1]])])
    with pytest.raises(ValueError, match="qid 'x' appears twice"):
        qvhighlights_metrics([{"qid": "x", "pred_relevant_windows": []}] * 2, [_gt("x", [[0, 1]])])
    with pytest.raises(ValueError, match="ground truth has no saliency_scores"):
        qvhighlights_metrics([{"qid": "x", "pred_relevant_windows": [], "pred_saliency_scores": [1]}],
                             [{"qid": "x", "duration": 10, "relevant_windows": [[0, 1]]}])


def _load_benchmark():
    return load_script("benchmarks/bench_qvhighlights_eval.py")


def test_vectorised_equals_the_per_query_loop_on_random_data():
    bench = _load_benchmark()
    submission, ground_truth = bench.make_data(120, seed=3)
    ours = bench.ours_as_loop_keys(qvhighlights_eval(submission, ground_truth))
    assert ours == bench.loop_eval(submission, ground_truth)


def test_submission_helpers_sort_and_cut():
    row = to_submission(3, [[0, 1, 0.2], [2, 3, 0.8]], [0.5, 0.25])
    assert row == {"qid": 3, "pred_relevant_windows": [[2.0, 3.0, 0.8], [0.0, 1.0, 0.2]], "pred_saliency_scores": [0.5, 0.25]}
    spans = np.stack([np.arange(12), np.arange(12) + 1], axis=-1)[None].astype(float)  # (1, 12, 2)
    scores = np.arange(12, dtype=float)[None]  # the last window is the best
    rows = predictions_to_submission(["q"], spans, scores, np.array([[1.0, 2.0, 3.0]]), np.array([[True, True, False]]))
    assert len(rows[0]["pred_relevant_windows"]) == 10
    assert rows[0]["pred_relevant_windows"][0] == [11.0, 12.0, 11.0]
    assert rows[0]["pred_saliency_scores"] == [1.0, 2.0]
