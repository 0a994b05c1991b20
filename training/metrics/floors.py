"""Question-blind floors: what answering about a random object of the same image or video scores; and the
floors of multiple-choice accuracy (chance, the most frequent answer letter).

The oracle sees the media but not the question: it picks one of the media's objects uniformly at random
(the asked one among them) and gives that object's exact answer. Its expected score is computed here
exactly, each object weighted 1/n, with the same metric code that scores the model, from the objects a
sample's annotations list (`meta["alternatives"]` of the RefCOCO and MeViS readers, `alternative_windows`
of a QVHighlights record). A grounding metric shows that the answer depends on the question only as far
as it rises above this floor.
"""

import numpy as np

from .mask import j_and_f, mask_iou_metrics
from .region import refcoco_accuracy
from .temporal import best_gt_iou


def region_query_blind_accuracy(gt_boxes_xyxy_pixels: list, alternative_boxes_xyxy_pixels: list[list],
                                threshold: float = 0.5) -> float:
    """Expected Acc@threshold (a fraction) of answering each query with a random object's box.

    gt_boxes_xyxy_pixels: per sample its GT box; alternative_boxes_xyxy_pixels: per sample every object's box.
    """
    scores = [refcoco_accuracy(boxes, [gt] * len(boxes), threshold=threshold)[f"Acc@{threshold}"] / 100
              for gt, boxes in zip(gt_boxes_xyxy_pixels, alternative_boxes_xyxy_pixels, strict=True)]
    return float(np.mean(scores))


def oracle_window(windows_seconds: list) -> list[float]:
    """The top-1 window a question-blind oracle gives for an object shown in `windows_seconds`: its longest."""
    return max(windows_seconds, key=lambda w: w[1] - w[0])[:2]


def temporal_query_blind_recall(gt_windows_seconds: list[list], alternative_windows_seconds: list[list[list]],
                                threshold: float = 0.5) -> float:
    """Expected R1@threshold (a fraction) of answering each query with a random object's longest window.

    gt_windows_seconds: per sample its GT windows; alternative_windows_seconds: per sample, per object, the
    object's windows.
    """
    scores = []
    for gt, objects in zip(gt_windows_seconds, alternative_windows_seconds, strict=True):
        best = best_gt_iou([oracle_window(windows) for windows in objects], [gt] * len(objects))
        scores.append(float(np.mean(best >= threshold)))
    return float(np.mean(scores))


def mask_query_blind_miou(gt_masks: list[list], alternative_masks: list[list[list]]) -> float:
    """Expected mask gIoU (a fraction) over every annotated frame, pooled as the model's `mask/miou` is
    (each frame one mask), when each query is answered with a random object's masks.

    gt_masks: per sample its per-frame masks; alternative_masks: per sample, per object, that object's masks on
    the same frames (None where the object has no mask: empty).
    """
    total, frames = 0.0, 0
    for gt, objects in zip(gt_masks, alternative_masks, strict=True):
        per_object = [mask_iou_metrics(masks, gt)["gIoU"] / 100 * len(gt) for masks in objects]
        total += float(np.mean(per_object))
        frames += len(gt)
    return total / frames


def mask_query_blind_j_and_f(gt_videos: list[list], alternative_masks: list[list[list]]) -> float:
    """Expected J&F (a fraction) over the videos when each expression is answered with a random object's masks
    (J&F averages over expressions, so the expectation is taken per expression)."""
    scores = [np.mean([j_and_f([masks], [gt])["J&F"] / 100 for masks in objects])
              for gt, objects in zip(gt_videos, alternative_masks, strict=True)]
    return float(np.mean(scores))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mask_object_choice(pred_masks: list[list], gt_masks: list[list], alternative_masks: list[list[list]]) -> dict:
    """Which of the media's objects predicted masks cover, over every frame whose asked object is visible.

    pred_masks, gt_masks: per sample its per-frame bool (H, W) masks (None: empty); alternative_masks: per sample,
    per object, its masks on the same frames (the asked object among them). Returns fractions:
    `asked_first`: frames where the prediction's IoU with the asked object beats its IoU with every other object;
    `asked_first_chance`: the same for a random visible object's exact mask (1 / visible objects, averaged);
    `union_miou`: mean IoU of the prediction with the union of the visible objects (near 1 for a model that
    segments every object whatever the question).
    """
    first, chance, union_ious = [], [], []
    for preds, gts, objects in zip(pred_masks, gt_masks, alternative_masks, strict=True):
        for frame, gt in enumerate(gts):
            if gt is None or not gt.any():
                continue
            visible = [obj[frame] for obj in objects if obj[frame] is not None and obj[frame].any()]
            if not visible:
                continue
            pred = preds[frame] if frame < len(preds) and preds[frame] is not None else np.zeros_like(gt)
            asked = int(np.argmax([_iou(mask, gt) for mask in visible]))
            ious = [_iou(pred, mask) for mask in visible]
            others = ious[:asked] + ious[asked + 1:]
            first.append(float(ious[asked] > 0 and all(ious[asked] > iou for iou in others)))
            chance.append(1.0 / len(visible))
            union_ious.append(_iou(pred, np.logical_or.reduce(visible)))
    if not first:
        return {}
    return {"asked_first": float(np.mean(first)), "asked_first_chance": float(np.mean(chance)),
            "union_miou": float(np.mean(union_ious))}


def mcqa_chance_accuracy(options: list[list[str]]) -> float:
    """Expected multiple-choice accuracy (a fraction) of picking an option uniformly at random."""
    return float(np.mean([1.0 / len(o) for o in options]))


def mcqa_constant_letter_accuracy(answer_letters: list[str]) -> float:
    """Multiple-choice accuracy (a fraction) of always answering the most frequent answer letter of these
    questions: the best any constant answer can do (an oracle of the letter prior, so at least chance)."""
    letters, counts = np.unique(np.asarray(answer_letters, dtype=object), return_counts=True)
    return float(counts.max() / len(answer_letters))
