"""Evidence that grounding uses the question: question-blind floors, query-swap controls, end-to-end routing,
and video masks supervised on frames drawn anew each step."""

import json
import math

import numpy as np
import pytest
import torch
from tiny_inputs import MASK_VIDEO, MEDIA, REGION, TEMPORAL, TEXT, build_model_and_processor, generation_batch

from tpo.processing.data_collator import sample_mask_frames
from tpo.processing.schema import empty_sample
from tpo.processing.synthetic import generate_synthetic_benchmark, load_split
from tpo.training.evaluation import (
    FLOORS,
    Predictions,
    TaskEvaluator,
    compute_task_metrics,
    control_metrics,
    format_table,
)
from tpo.training.metrics import as_mask, mask_to_rle
from tpo.training.metrics.floors import (
    mask_object_choice,
    mask_query_blind_miou,
    region_query_blind_accuracy,
    temporal_query_blind_recall,
)


# ------------------------------------------------------------------------------------------------
# Floors
# ------------------------------------------------------------------------------------------------
def test_floors_by_hand():
    # two objects, one of them the target: the oracle is right half of the time
    assert region_query_blind_accuracy([[0, 0, 10, 10]], [[[0, 0, 10, 10], [20, 20, 30, 30]]]) == 0.5
    # three objects, one overlapping the target with IoU 0.6 (>= 0.5): two thirds
    assert region_query_blind_accuracy([[0, 0, 10, 10]], [[[0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60]]]) == \
        pytest.approx(2 / 3)
    # windows: the longest window of each object is its answer; IoU([2, 6], [3, 8]) = 3 / 6 = 0.5 counts
    gt = [[2.0, 6.0]]
    assert temporal_query_blind_recall([gt], [[gt, [[3.0, 8.0], [9.0, 9.5]], [[10.0, 12.0]]]]) == pytest.approx(2 / 3)
    # masks: the target itself (IoU 1) or a disjoint object (IoU 0) on two frames, pooled over frames
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[2:] = True, True
    assert mask_query_blind_miou([[a, a]], [[[a, a], [b, None]]]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def synthetic_test(tmp_path_factory):
    manifest = generate_synthetic_benchmark(tmp_path_factory.mktemp("floors"), size="small", seed=5)
    return load_split(manifest, "test", ("temporal", "region", "mask_image", "mask_video"))


def _oracle_predictions(parts: dict, choice: int) -> Predictions:
    """Each sample answered with its media's object number `choice % count` (exactly that object's answer)."""
    predictions = Predictions()
    for row in parts["region"]:
        boxes = json.loads(row["meta"])["alternatives"]["boxes_xyxy_pixels"]
        predictions.region.append({"id": row["id"], "pred_box": boxes[choice % len(boxes)],
                                   "gt_box": row["boxes_xyxy_pixels"][0], "alternatives": boxes})
    for row in parts["temporal"]:
        meta = json.loads(row["meta"])
        objects = meta["alternative_windows"]
        chosen = max(objects[choice % len(objects)], key=lambda w: w[1] - w[0])
        clips = math.ceil(row["duration_seconds"] / 2)
        predictions.temporal.append({
            "id": row["id"], "qid": meta["qid"], "windows": [[*chosen, 1.0]], "clip_scores": [0.0] * clips,
            "gt_windows": [list(w) for w in row["spans_seconds"]], "duration": row["duration_seconds"],
            "relevant_clip_ids": list(row["saliency_clip_ids"]), "saliency_scores": [list(s) for s in row["saliency_scores"]],
            "alternatives": objects})
    for row in list(parts["mask_image"]) + list(parts["mask_video"]):
        objects = json.loads(row["meta"])["alternatives"]["masks_rle"]
        video = row["media_type"] != "image"
        objects = objects if video else [[rle] for rle in objects]
        chosen = objects[choice % len(objects)]
        gt = [as_mask(rle) for rle in row["masks_rle"]]
        predictions.mask.append({"id": row["id"], "video": video, "gt": gt, "alternatives": objects,
                                 "pred": [np.zeros_like(gt[0]) if m is None else as_mask(m) for m in chosen]})
    return predictions


def test_floors_equal_a_question_blind_oracle_through_the_metric_code(synthetic_test):
    """Choosing object k mod n for every sample, for k over a common multiple of the object counts, picks each
    object of every sample equally often: the mean of the metrics over those choices is exactly the oracle's
    expected score, which the floors must equal."""
    counts = [len(json.loads(r["meta"])["alternatives"]["boxes_xyxy_pixels"]) for r in synthetic_test["region"]]
    counts += [len(json.loads(r["meta"])["alternative_windows"]) for r in synthetic_test["temporal"]]
    counts += [len(json.loads(r["meta"])["alternatives"]["masks_rle"]) for r in synthetic_test["mask_image"]]
    counts += [len(json.loads(r["meta"])["alternatives"]["masks_rle"]) for r in synthetic_test["mask_video"]]
    cycle = math.lcm(*counts)
    runs = [compute_task_metrics(_oracle_predictions(synthetic_test, k)) for k in range(cycle)]
    for metric, floor in FLOORS.items():
        oracle = np.mean([run[metric] for run in runs])
        assert all(run[floor] == pytest.approx(runs[0][floor], abs=1e-12) for run in runs)  # a property of the data
        assert runs[0][floor] == pytest.approx(oracle, abs=1e-9), metric
    # and the floors are real floors: neither 0 (no distractor) nor 1 (no choice)
    assert 0.0 < runs[0]["floor/region_query_blind_acc@0.5"] < 1.0
    # the right object every time scores 1 where the floor does not
    perfect = _oracle_predictions(synthetic_test, 0)
    for entry in perfect.region:
        entry["pred_box"] = entry["gt_box"]
    assert compute_task_metrics(perfect)["region/acc@0.5"] == 1.0


def test_floors_need_every_sample_to_list_its_objects():
    predictions = Predictions(region=[{"id": "a", "pred_box": [0, 0, 1, 1], "gt_box": [0, 0, 1, 1],
                                       "alternatives": [[0, 0, 1, 1]]},
                                      {"id": "b", "pred_box": [0, 0, 1, 1], "gt_box": [0, 0, 1, 1], "alternatives": None}])
    metrics = compute_task_metrics(predictions)
    assert metrics["region/acc@0.5"] == 1.0 and FLOORS["region/acc@0.5"] not in metrics


def test_control_metrics_keep_the_named_task_and_the_table_shows_floors():
    metrics = {"region/acc@0.5": 0.8, "region/miou": 0.7, "temporal/r1@0.5": 0.1, "router/accuracy": 1.0}
    assert control_metrics("region_query_swap", metrics) == {"control/region_query_swap_acc@0.5": 0.8,
                                                             "control/region_query_swap_miou": 0.7}
    masks = {"mask/miou": 0.3, "mask/j&f": 0.4, "region/acc@0.5": 0.9}
    assert control_metrics("mask_query_swap", masks) == {"control/mask_query_swap_miou": 0.3,
                                                         "control/mask_query_swap_j&f": 0.4}
    table = format_table({"region/acc@0.5": 0.8, FLOORS["region/acc@0.5"]: 0.35, "control/region_query_swap_acc@0.5": 0.7})
    row = next(line for line in table.splitlines() if line.startswith("region/acc@0.5"))
    assert "0.8000  0.3500  +0.450" in row
    assert not any(line.startswith("floor/") for line in table.splitlines())  # floors sit beside their metric


# ------------------------------------------------------------------------------------------------
# End-to-end routing
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    return build_model_and_processor("llava")


def _evaluate_with_boosted_token(model, processor, token_id: int | None) -> dict:
    """Metrics of the three samples while the LM's logit of `token_id` is raised far above the rest."""
    head = model.mllm.get_output_embeddings()

    def boost(module, inputs, output):
        if token_id is not None:
            output = output.clone()
            output[..., token_id] += 1e4
        return output

    handle = head.register_forward_hook(boost)
    try:
        samples = [empty_sample(**sample) for sample in (REGION, TEMPORAL, TEXT)]
        evaluator = TaskEvaluator(processor, samples, batch_size=3, max_new_tokens=3,
                                  media_loader=lambda plan, targets: MEDIA[{"image": "r1", "video": "t1"}[plan["kind"]]]
                                  if plan.get("path") != "x.png" or plan["height"] != 64 else MEDIA["c1"])
        return evaluator.predict(model)
    finally:
        handle.remove()


def test_end_to_end_routing_counts_what_the_lm_emits_first(llava):
    model, processor = llava
    ids = model.config.task_token_ids
    tokenizer = processor.tokenizer
    word = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("red")[0])
    cases = {  # boosted token -> (emitted per sample: region, temporal, text; end-to-end accuracy)
        ids["mask"]["begin"]: (["mask", "mask", "mask"], 0.0),  # the LM opens the wrong task everywhere
        ids["region"]["begin"]: (["region", "region", "region"], 1 / 3),  # right for the region prompt only
        word: (["text", "text", "text"], 1 / 3),  # text for the grounding prompts (wrong), a word for the text one
        tokenizer.eos_token_id: (["text", "text", "text"], 0.0),  # the text answer is empty: wrong too
    }
    for token, (emitted, accuracy) in cases.items():
        predictions = _evaluate_with_boosted_token(model, processor, token)
        assert [r["emitted"] for r in predictions.routing] == emitted, token
        metrics = compute_task_metrics(predictions)
        assert metrics["router/end_to_end_accuracy"] == pytest.approx(accuracy), token
        assert metrics["router/empty_text_answers"] == float(token == tokenizer.eos_token_id)


def test_the_logits_at_the_prompt_end_are_the_first_greedy_step(llava):
    """The grounding prompts' routing reads the LM's logits at the last prompt token of a force_task pass:
    that is the token greedy generation from the bare prompt emits first."""
    model, processor = llava

    for sample in (REGION, TEMPORAL):
        forced = generation_batch(processor, [sample], modes=["force_task"])
        with torch.no_grad():
            logits = model(**{k: v for k, v in forced.items() if k not in ("labels", "task_labels")}).logits
        first = int(logits[0, forced["instruction_end_index"][0]].argmax())
        bare = generation_batch(processor, [sample], modes=["generate"])
        bare = {k: v for k, v in bare.items() if k not in ("labels", "task_labels", "region_boxes", "region_batch_index",
                                                             "temporal_spans", "temporal_span_query_index",
                                                             "temporal_saliency")}
        generated = model.generate(**bare, max_new_tokens=1, do_sample=False, return_dict_in_generate=False)
        assert int(generated[0, bare["input_ids"].shape[1]]) == first


# ------------------------------------------------------------------------------------------------
# Video mask frames drawn anew each step
# ------------------------------------------------------------------------------------------------
def test_video_mask_frames_are_drawn_anew_in_time_order():
    targets = {"mask_frames": list(range(8)), "masks_rle": [{"id": i} for i in range(8)]}
    generator = torch.Generator().manual_seed(0)
    draws = [sample_mask_frames(targets, 3, generator) for _ in range(60)]
    for draw in draws:
        assert len(draw["mask_frames"]) == 3 and draw["mask_frames"] == sorted(set(draw["mask_frames"]))
        assert [m["id"] for m in draw["masks_rle"]] == draw["mask_frames"]  # masks stay with their frames
    assert len({tuple(d["mask_frames"]) for d in draws}) > 10  # not the same frames every step
    assert {f for d in draws for f in d["mask_frames"]} == set(range(8))  # every frame gets supervised
    assert sample_mask_frames(targets, 8) is targets and sample_mask_frames(targets, 0) is targets
    image = {"mask_frames": [-1], "masks_rle": [{"id": 0}]}
    assert sample_mask_frames(image, 1) is image


def test_evaluation_scores_every_annotated_frame(llava):

    model, processor = llava
    processor.mask_frames_per_video = 1  # training's frames per step do not limit evaluation
    try:
        video = TaskEvaluator(processor, [MASK_VIDEO], batch_size=1, media_loader=lambda plan, targets: MEDIA["mv1"],
                              mask_video_mode="per_frame").predict(model).mask[0]
    finally:
        processor.mask_frames_per_video = 4
    assert video["frames"] == [0, 4, 8] and len(video["pred"]) == len(video["gt"]) == 3


def _squares() -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint 2x2 objects of an 8x8 frame: A on the left, B on the right."""
    left, right = np.zeros((8, 8), dtype=bool), np.zeros((8, 8), dtype=bool)
    left[2:4, 1:3] = True
    right[2:4, 5:7] = True
    return left, right


def test_mask_object_choice_by_hand():
    a, b = _squares()
    both, empty = a | b, np.zeros_like(a)
    choice = mask_object_choice(
        pred_masks=[[a], [both], [empty, a]],
        gt_masks=[[a], [b], [a, None]],  # the last sample's second frame has no asked object: not scored
        alternative_masks=[[[a], [b]], [[a], [b]], [[a, a], [None, b]]],  # B is not visible on that frame 0
    )
    # first: A exactly (1); A and B together ties A with B (0); an empty mask overlaps nothing (0)
    assert choice["asked_first"] == pytest.approx(1 / 3)
    assert choice["asked_first_chance"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    # IoU with the union of the visible objects: 4 / 8, 8 / 8, 0 / 4
    assert choice["union_miou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert mask_object_choice([[empty]], [[None]], [[[a]]]) == {}


def test_mask_metrics_report_the_object_choice_beside_its_chance():
    a, b = _squares()
    rle = {name: mask_to_rle(m) for name, m in (("a", a), ("b", b), ("ab", a | b))}
    masks = [{"id": "x", "pred": [rle["ab"]], "gt": [rle["a"]], "video": False, "alternatives": [[rle["a"]], [rle["b"]]]},
             {"id": "y", "pred": [rle["b"]], "gt": [rle["b"]], "video": False, "alternatives": [[rle["a"]], [rle["b"]]]}]
    metrics = compute_task_metrics(Predictions(mask=masks))
    assert metrics["mask/asked_first"] == 0.5 and metrics[FLOORS["mask/asked_first"]] == 0.5
    assert metrics["mask/union_miou"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["mask/miou"] == pytest.approx((0.5 + 1.0) / 2)
