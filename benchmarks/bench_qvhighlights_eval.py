"""QVHighlights evaluation speed: the vectorised `qvhighlights_eval` against a straightforward per-query
Python loop (written here, following the official moment_detr `standalone_eval` step by step).

1,550 synthetic queries (the size of the val split), 10 predicted windows and per-clip saliency each,
with tied scores on purpose. Both run in this process on one thread; their numbers must agree exactly
(asserted), then the times and the ratio are printed. Target: ours < 2 s.

    python benchmarks/bench_qvhighlights_eval.py [--queries 1550] [--repeats 3] [--seed 0]
"""

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # one core, before numpy loads its thread pools

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from tpo.training.metrics.qvhighlights import qvhighlights_eval  # noqa: E402

IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
RANGES = [("short", 0, 10), ("middle", 10, 30), ("long", 30, 150), ("full", 0, 150)]
LEVELS = [("Fair", 2), ("Good", 3), ("VeryGood", 4)]


def make_data(num_queries: int, seed: int) -> tuple[list[dict], list[dict]]:
    """QVHighlights-like GT rows and a submission, with rounded (so partly tied) scores."""
    rng = np.random.default_rng(seed)
    submission, ground_truth = [], []
    for qid in range(num_queries):
        duration = float(rng.choice([150, 150, 150, 126, 140]))
        num_clips = int(duration // 2)
        windows = []
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.choice([2, 4, 6, 8, 10, 14, 20, 30, 40, 60]))
            start = int(rng.integers(0, max(1, (duration - length) // 2))) * 2
            windows.append([float(start), float(min(start + length, duration))])
        clip_ids = sorted({c for s, e in windows for c in range(int(s // 2), int(e // 2)) if c < num_clips})
        ground_truth.append({"qid": qid, "duration": duration, "relevant_windows": windows, "relevant_clip_ids": clip_ids,
                             "saliency_scores": rng.integers(0, 5, size=(len(clip_ids), 3)).tolist()})
        predicted = []
        for _ in range(10):
            if rng.random() < 0.5:  # near a GT window
                s, e = windows[int(rng.integers(len(windows)))]
                s, e = s + rng.normal(0, 2), e + rng.normal(0, 2)
            else:
                s = rng.uniform(0, duration - 4)
                e = s + rng.uniform(2, 40)
            predicted.append([round(float(min(s, e)), 1), round(float(max(s, e) + 0.1), 1), round(float(rng.random()), 1)])
        saliency = np.round(rng.random(num_clips + int(rng.integers(-3, 3))), 1).tolist()
        submission.append({"qid": qid, "pred_relevant_windows": predicted, "pred_saliency_scores": saliency})
    return submission, ground_truth


# ---------------------------------------------------------------- the straightforward per-query loop


def loop_iou(a, b) -> float:
    intersection = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return intersection / union if union > 0 else 0.0


def loop_interpolated_ap(precision: list, recall: list) -> float:
    m_precision = [0.0] + precision + [0.0]
    m_recall = [0.0] + recall + [1.0]
    for i in range(len(m_precision) - 2, -1, -1):
        m_precision[i] = max(m_precision[i], m_precision[i + 1])
    return sum((m_recall[i] - m_recall[i - 1]) * m_precision[i] for i in range(1, len(m_recall)) if m_recall[i] != m_recall[i - 1])


def loop_query_ap(predictions: list, gt_windows: list) -> list[float]:
    if not predictions:
        return [0.0] * len(IOU_THRESHOLDS)
    predictions = sorted(predictions, key=lambda w: -w[2])
    out = []
    for threshold in IOU_THRESHOLDS:
        locked = [False] * len(gt_windows)
        tp, fp = [], []
        for window in predictions:
            ious = [loop_iou(window, g) for g in gt_windows]
            order = sorted(range(len(ious)), key=lambda j: (ious[j], j), reverse=True)  # argsort()[::-1]
            hit = False
            for j in order:
                if ious[j] < threshold:
                    break
                if locked[j]:
                    continue
                locked[j], hit = True, True
                break
            tp.append(1.0 if hit else 0.0)
            fp.append(0.0 if hit else 1.0)
        tp_sum, fp_sum, precision, recall = 0.0, 0.0, [], []
        for t, f in zip(tp, fp):
            tp_sum, fp_sum = tp_sum + t, fp_sum + f
            precision.append(tp_sum / (tp_sum + fp_sum))
            recall.append(tp_sum / len(gt_windows))
        out.append(loop_interpolated_ap(precision, recall))
    return out


def loop_highlight_ap(labels: list, scores: list) -> float:
    """get_ap with scikit-learn's precision_recall_curve semantics, written as loops."""
    if len(set(labels)) == 1:
        return 0.0 if labels[0] == 0 else 1.0
    positives = sum(labels)
    precision, recall = [], []
    for threshold in sorted(set(scores), reverse=True):  # one point per distinct score
        tp = sum(1 for y, s in zip(labels, scores) if s >= threshold and y)
        fp = sum(1 for y, s in zip(labels, scores) if s >= threshold and not y)
        precision.append(tp / (tp + fp))
        recall.append(tp / positives)
    precision, recall = precision[::-1] + [1.0], recall[::-1] + [0.0]
    for i in range(1, len(precision)):
        precision[i] = max(precision[i - 1], precision[i])
    points = [precision[i] for i in range(len(recall) - 1) if recall[i + 1] != recall[i]]
    return sum(points) / len(points)


def loop_eval(submission: list[dict], ground_truth: list[dict]) -> dict:
    predictions = {d["qid"]: d for d in submission}
    brief = {}
    for name, low, high in RANGES:
        aps, r1 = [], []
        for d in ground_truth:
            windows = [w for w in d["relevant_windows"] if name == "full" or low < w[1] - w[0] <= high]
            if not windows:
                continue
            predicted = predictions[d["qid"]]["pred_relevant_windows"][:10]
            aps.append(loop_query_ap(predicted, windows))
            r1.append(max(loop_iou(predicted[0], w) for w in windows) if predicted else 0.0)
        per_threshold = [sum(a[t] for a in aps) / len(aps) for t in range(len(IOU_THRESHOLDS))]
        brief[f"{name}-mAP"] = float(f"{100 * np.mean(per_threshold):.2f}")
        brief[f"{name}-mAP@0.5"] = float(f"{100 * per_threshold[0]:.2f}")
        brief[f"{name}-mAP@0.75"] = float(f"{100 * per_threshold[5]:.2f}")
        brief[f"{name}-R1@0.5"] = float(f"{100 * np.mean([v >= 0.5 for v in r1]):.2f}")
        brief[f"{name}-R1@0.7"] = float(f"{100 * np.mean([v >= 0.7 for v in r1]):.2f}")
    for level, minimum in LEVELS:
        aps, hits = [], []
        for d in ground_truth:
            num_clips = int(d["duration"] / 2)
            gt = [[0, 0, 0] for _ in range(num_clips)]
            for clip, values in zip(d["relevant_clip_ids"], d["saliency_scores"]):
                gt[clip] = values
            scores = predictions[d["qid"]]["pred_saliency_scores"]
            top = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first maximum, as np.argmax
            hits.append(1.0 if top < num_clips and any(v >= minimum for v in gt[top]) else 0.0)
            cut = (scores[:num_clips] + [0.0] * num_clips)[:num_clips]
            for annotator in range(3):
                aps.append(loop_highlight_ap([1 if row[annotator] >= minimum else 0 for row in gt], cut))
        brief[f"HL-{level}-mAP"] = float(f"{100 * np.mean(aps):.2f}")
        brief[f"HL-{level}-Hit1"] = float(f"{100 * np.mean(hits):.2f}")
    return brief


def ours_as_loop_keys(result: dict) -> dict:
    """Our official-structure output under the loop's key names."""
    out = {}
    for name, _, _ in RANGES:
        out[f"{name}-mAP"] = result[name]["MR-mAP"]["average"]
        out[f"{name}-mAP@0.5"] = result[name]["MR-mAP"]["0.5"]
        out[f"{name}-mAP@0.75"] = result[name]["MR-mAP"]["0.75"]
        out[f"{name}-R1@0.5"] = result[name]["MR-R1"]["0.5"]
        out[f"{name}-R1@0.7"] = result[name]["MR-R1"]["0.7"]
    for level, _ in LEVELS:
        out[f"HL-{level}-mAP"] = result[f"HL-min-{level}"]["HL-mAP"]
        out[f"HL-{level}-Hit1"] = result[f"HL-min-{level}"]["HL-Hit1"]
    return out


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1550)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    submission, ground_truth = make_data(args.queries, args.seed)
    ours_seconds, ours = best_time(lambda: qvhighlights_eval(submission, ground_truth), args.repeats)
    loop_seconds, reference = best_time(lambda: loop_eval(submission, ground_truth), max(1, args.repeats // 2))
    ours_flat = ours_as_loop_keys(ours)
    differing = {k: (ours_flat[k], reference[k]) for k in reference if ours_flat[k] != reference[k]}
    assert not differing, f"vectorised and loop evaluations disagree: {differing}"
    print(f"queries: {args.queries}, 10 windows + saliency each; all {len(reference)} metrics agree")
    print(f"MR-full-mAP {ours['brief']['MR-full-mAP']}  HL-min-VeryGood-mAP {ours['brief']['HL-min-VeryGood-mAP']}")
    print(f"vectorised qvhighlights_eval: {ours_seconds:.3f} s (target < 2 s)")
    print(f"per-query Python loop:        {loop_seconds:.3f} s")
    print(f"speed-up: {loop_seconds / ours_seconds:.1f}x")


if __name__ == "__main__":
    main()
