"""generate(): transformers' text semantics kept, task heads on the generated slot tokens (values equal a
plain forward over the same sequences), forced tasks, post-processing, video masks tracked through SAM2's
memory (`track_masks`, also in the evaluator), and bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny_inputs import (
    FRAME_H,
    FRAME_W,
    MASK_IMAGE,
    MASK_VIDEO,
    MEDIA,
    REGION,
    SAM2_SIZE,
    TEMPORAL,
    TEXT,
    TEXT_LONG,
    build_model_and_processor,
    generation_batch,
)
from transformers import LogitsProcessor, LogitsProcessorList

from tpo.modeling_tpo.box_ops import masks_to_boxes
from tpo.modeling_tpo.generation_tpo import append_to_left_padded, incomplete_slot_runs
from tpo.modeling_tpo.mask_head import OUTSIDE_BOX_LOGIT, bound_to_boxes
from tpo.processing.collator_tpo import collate_encoded
from tpo.processing.processing_tpo import decode_rle
from tpo.training.evaluation import TaskEvaluator, compute_task_metrics

PER_TOKEN_FILL = {"frame_token_index": -1, "query_token_mask": False, "visual_token_xy": -1.0, "mm_token_type_ids": 0}
MLLM_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
             "video_grid_thw", "mm_token_type_ids")


@pytest.fixture(scope="module")
def llava():
    return build_model_and_processor("llava")


def _ids(model, task: str) -> tuple[int, list[int]]:
    entry = model.config.task_token_ids[task]
    return entry["begin"], entry["slots"]


def _all_task_token_ids(model) -> list[int]:
    return [i for t in model.config.task_token_ids.values() for i in [t["begin"], *t["slots"]]]


class ForceTokens(LogitsProcessor):
    """Row i emits token `plan[i][step]` at generation step `step`, and no end of sequence before it."""

    def __init__(self, prompt_len: int, plan: dict[int, dict[int, int]], eos_token_id: int):
        self.prompt_len, self.plan, self.eos = prompt_len, plan, eos_token_id

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        scores = scores.clone()
        for row, steps in self.plan.items():
            if step in steps:
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, steps[step]] = 0.0
            elif step < max(steps):
                scores[row, self.eos] = torch.finfo(scores.dtype).min
        return scores


class NoTokens(LogitsProcessor):
    """Never emit the given tokens (the LM "would not" ask for a task)."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token_ids] = torch.finfo(scores.dtype).min
        return scores


def _right_padded(batch: dict, sequences: torch.Tensor, eos: int, pad: int) -> dict:
    """Hand-built forward inputs: each row's prompt (left padding removed) + its generated tokens up to and
    including the first end of sequence, right-padded; per-token inputs follow, `instruction_end_index` too."""
    prompt_len = batch["input_ids"].shape[1]
    rows, lefts = [], []
    for i in range(sequences.shape[0]):
        left = int((batch["attention_mask"][i] == 0).sum())
        new = sequences[i, prompt_len:].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        rows.append(sequences[i, left:prompt_len].tolist() + new)
        lefts.append(left)
    length = max(len(r) for r in rows)
    out = {"input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
           "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])}
    for key, fill in PER_TOKEN_FILL.items():
        if key not in batch:
            continue
        value = batch[key]
        tensor = torch.full((len(rows), length, *value.shape[2:]), fill, dtype=value.dtype)
        for i, left in enumerate(lefts):
            tensor[i, : prompt_len - left] = value[i, left:]
        out[key] = tensor
    out["instruction_end_index"] = batch["instruction_end_index"] - torch.tensor(lefts)
    for key in ("pixel_values", "image_grid_thw", "frame_timestamps", "video_durations"):
        if key in batch:
            out[key] = batch[key]
    return out


# ------------------------------------------------------------------------------------------------
# Text semantics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_greedy_text_equals_the_wrapped_mllm_in_a_left_padded_batch(family, llava):
    model, processor = (llava if family == "llava"
                        else build_model_and_processor("qwen2_vl", tasks=("temporal", "region")))
    batch = generation_batch(processor, [TEXT, TEXT_LONG])
    assert (batch["attention_mask"][0] == 0).any() and batch["attention_mask"][1].all()  # left padding
    mllm_inputs = {k: batch[k] for k in MLLM_KEYS if k in batch}
    expected = model.mllm.generate(**mllm_inputs, max_new_tokens=8, do_sample=False)
    assert not torch.isin(expected, torch.tensor(_all_task_token_ids(model))).any()  # no task asked for
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert out.task_outputs == [None, None] and out.head_outputs is None
    plain = model.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=False)
    assert torch.equal(plain, expected)


def test_sampling_is_reproducible_and_is_the_mllm_with_the_task_processor(llava):
    model, processor = llava
    batch = generation_batch(processor, [TEXT, TEXT_LONG])
    mllm_inputs = {k: batch[k] for k in MLLM_KEYS if k in batch}
    settings = dict(max_new_tokens=8, do_sample=True, temperature=1.0)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(**batch, **settings).sequences)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    for seed, run in ((7, runs[0]), (8, runs[2])):  # each seed's draw is the MLLM's own
        torch.manual_seed(seed)
        reference = model.mllm.generate(**mllm_inputs, **settings,
                                        logits_processor=LogitsProcessorList([model.task_token_logits_processor()]))
        assert torch.equal(run, reference)


def test_num_return_sequences_with_heads_raises(llava):
    model, processor = llava
    batch = generation_batch(processor, [TEXT])
    with pytest.raises(ValueError, match=r"one sequence per prompt; with num_return_sequences > 1 pass "
                                         r"run_task_heads=False"):
        model.generate(**batch, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    out = model.generate(**batch, max_new_tokens=2, do_sample=True, num_return_sequences=2, run_task_heads=False)
    assert out.sequences.shape[0] == 2 and out.task_outputs is None


# ------------------------------------------------------------------------------------------------
# Heads on generated task tokens
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(llava):
    """One generation over region, temporal, video mask, image mask and text prompts; rows 0-3 are made to
    emit their task's begin token at different steps, row 4 asks for nothing."""
    model, processor = llava
    samples = [REGION, TEMPORAL, MASK_VIDEO, MASK_IMAGE, TEXT]
    batch = generation_batch(processor, samples)
    eos = model.generation_config.eos_token_id
    plan = {0: {1: _ids(model, "region")[0]}, 1: {2: _ids(model, "temporal")[0]},
            2: {0: _ids(model, "mask")[0]}, 3: {1: _ids(model, "mask")[0]}}
    force = ForceTokens(batch["input_ids"].shape[1], plan, eos)
    banned = NoTokens([_ids(model, t)[0] for t in ("region", "temporal", "mask")])

    def run(**kwargs):
        processors = LogitsProcessorList([force if kwargs.pop("forced", True) else banned])
        return model.generate(**batch, max_new_tokens=6, do_sample=False, logits_processor=processors, **kwargs)

    return {"model": model, "processor": processor, "batch": batch, "plan": plan, "out": run(), "run": run}


def test_slot_follows_the_begin_token_and_only_asking_samples_get_outputs(mixed):
    model, batch, out, plan = mixed["model"], mixed["batch"], mixed["out"], mixed["plan"]
    prompt_len = batch["input_ids"].shape[1]
    for row, task in enumerate(["region", "temporal", "mask", "mask"]):
        step = next(iter(plan[row]))
        begin, slots = _ids(model, task)
        assert out.sequences[row, prompt_len + step].item() == begin
        assert out.sequences[row, prompt_len + step + 1].item() == slots[0]
    assert not torch.isin(out.sequences[4], torch.tensor(_all_task_token_ids(model))).any()
    assert [set(t) if t else None for t in out.task_outputs] == [{"region"}, {"temporal"}, {"mask"}, {"mask"}, None]


def test_region_and_temporal_outputs_equal_a_plain_forward(mixed):
    model, batch, out = mixed["model"], mixed["batch"], mixed["out"]
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    inputs = _right_padded({k: v[:2] for k, v in batch.items() if k != "pixel_values"}, out.sequences[:2], eos, pad)
    # rows 0-1 only: the region image (pixel row 0) and the temporal video (pixel rows 1-4)
    inputs["pixel_values"] = batch["pixel_values"][:5]
    with torch.no_grad():
        reference = model(**inputs)
    torch.testing.assert_close(out.task_outputs[0]["region"]["boxes"], reference.pred_boxes)
    assert reference.pred_boxes_batch_index.tolist() == [0]
    windows = model.temporal_head.predict_windows(reference.temporal_outputs)[0]
    got = out.task_outputs[1]["temporal"]
    assert len(got["windows"]) == 1 and len(got["windows"][0]) == model.config.temporal_head_config["num_queries"]
    np.testing.assert_allclose(np.array(got["windows"][0]), np.array(windows), rtol=1e-5, atol=1e-6)
    frame_mask = reference.temporal_outputs["frame_mask"][0]
    torch.testing.assert_close(got["saliency"][0], reference.temporal_outputs["pred_saliency"][0][frame_mask])
    torch.testing.assert_close(got["frame_times"][0], torch.tensor([1.0, 3.0, 5.0, 7.0]) / 8.0)


def test_video_masks_are_tracked_and_image_masks_equal_a_plain_forward(mixed):
    model, batch, out = mixed["model"], mixed["batch"], mixed["out"]
    assert batch["mask_query_index"].tolist() == [0, 0, 0, 1]  # 3 SAM2 frames of the video, 1 image
    video, image = out.task_outputs[2]["mask"], out.task_outputs[3]["mask"]
    assert video["mode"] == ["propagate"] and image["mode"] == ["per_frame"]
    logits, boxes = video["mask_logits"][0], video["boxes"][0]
    assert logits.shape == (3, SAM2_SIZE, SAM2_SIZE) and boxes.shape == (3, 4)
    torch.testing.assert_close(boxes, masks_to_boxes(logits > 0) / SAM2_SIZE)
    torch.testing.assert_close(video["visible"][0], (logits > 0).flatten(1).any(1))
    # the other frames are reached by propagation from the head's mask of the first frame
    per_frame = mixed["run"](mask_video_mode="per_frame").task_outputs
    assert per_frame[2]["mask"]["mode"] == ["per_frame"] and per_frame[2]["mask"]["mask_logits"][0].shape == (3, 16, 16)
    frames = batch["sam2_pixel_values"][:3]
    tracked = model.track_masks(frames, first_frame_mask_logits=per_frame[2]["mask"]["mask_logits"][0][:1])[0]
    torch.testing.assert_close(logits, tracked["mask_logits"])
    # per-frame masks (both modes for the image; per_frame mode for the video) equal a plain forward
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    rows = slice(2, 4)
    inputs = _right_padded({k: v[rows] for k, v in batch.items() if k != "pixel_values"}, out.sequences[rows], eos, pad)
    inputs["pixel_values"] = batch["pixel_values"][5:10]  # the video's 4 frames and the image
    with torch.no_grad():
        reference = model(**inputs, sam2_pixel_values=batch["sam2_pixel_values"],
                          mask_query_index=batch["mask_query_index"])
    expected = reference.mask_outputs["pred_mask_logits"]
    torch.testing.assert_close(image["mask_logits"][0], expected[3:])
    torch.testing.assert_close(per_frame[2]["mask"]["mask_logits"][0], expected[:3])
    torch.testing.assert_close(image["boxes"][0], masks_to_boxes(expected[3:] > 0) / 16)


def test_region_outputs_equal_a_plain_forward_with_qwen2_vl_positions():
    model, processor = build_model_and_processor("qwen2_vl", tasks=("temporal", "region"))
    batch = generation_batch(processor, [TEXT_LONG, REGION])
    assert (batch["attention_mask"][1] == 0).any()  # the region prompt is left-padded
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    force = ForceTokens(batch["input_ids"].shape[1], {1: {2: _ids(model, "region")[0]}}, eos)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, logits_processor=LogitsProcessorList([force]))
    assert out.task_outputs[0] is None and out.task_outputs[1]["region"]["boxes"].shape == (1, 4)
    with torch.no_grad():
        reference = model(**_right_padded(batch, out.sequences, eos, pad))
    torch.testing.assert_close(out.task_outputs[1]["region"]["boxes"], reference.pred_boxes)
    torch.testing.assert_close(out.head_outputs.router_logits, reference.router_logits)


def test_post_processing_of_generated_outputs(mixed):
    processor, out = mixed["processor"], mixed["out"]
    boxes = out.task_outputs[0]["region"]["boxes"]
    pixels = processor.post_process_boxes(boxes, [(128, 96)])
    np.testing.assert_allclose(pixels, (boxes * torch.tensor([96, 128, 96, 128])).numpy(), rtol=1e-5)
    temporal = out.task_outputs[1]["temporal"]
    seconds = processor.post_process_spans(temporal["windows"], [8.0])[0]
    np.testing.assert_allclose(np.array(seconds)[:, :2], np.array(temporal["windows"][0])[:, :2] * 8.0, rtol=1e-5)
    assert all(0.0 <= s <= e <= 8.0 for s, e, _ in seconds)
    times = (temporal["frame_times"][0] * 8.0).tolist()
    clips = processor.post_process_saliency(temporal["saliency"][0][None], [times], [8.0])[0]
    assert len(clips) == 4  # 8 s of 2-second clips; each takes its nearest frame (1, 3, 5, 7 s)
    torch.testing.assert_close(torch.tensor(clips), temporal["saliency"][0].float())
    video = out.task_outputs[2]["mask"]
    masks = processor.post_process_masks(video["mask_logits"][0], [(FRAME_H, FRAME_W)] * 3)
    assert len(masks) == 3
    for entry, logits in zip(masks, video["mask_logits"][0]):
        assert entry["mask"].shape == (FRAME_H, FRAME_W) and entry["mask"].dtype == bool
        assert entry["rle"]["size"] == [FRAME_H, FRAME_W] and np.array_equal(decode_rle(entry["rle"]), entry["mask"])
    expected_boxes = video["boxes"][0] * torch.tensor([FRAME_W, FRAME_H, FRAME_W, FRAME_H])
    np.testing.assert_allclose(processor.post_process_mask_boxes(video["boxes"][0], [(FRAME_H, FRAME_W)] * 3),
                               expected_boxes.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Forced tasks
# ------------------------------------------------------------------------------------------------
def test_force_task_prompt_and_force_task_argument_give_head_outputs(llava):
    model, processor = llava
    banned = LogitsProcessorList([NoTokens([_ids(model, t)[0] for t in ("region", "temporal", "mask")])])
    # 1. prompts encoded in the processor's "force_task" mode
    forced_batch = generation_batch(processor, [REGION, TEXT], modes=["force_task", "generate"])
    out = model.generate(**forced_batch, max_new_tokens=4, do_sample=False, logits_processor=banned)
    assert out.task_outputs[1] is None and set(out.task_outputs[0]) == {"region"}
    # the slot sees only the prompt (causal attention): the box is the forward's over the prompt alone
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    prompt_only = _right_padded(forced_batch, forced_batch["input_ids"], eos, pad)
    with torch.no_grad():
        reference = model(**prompt_only)
    torch.testing.assert_close(out.task_outputs[0]["region"]["boxes"], reference.pred_boxes)
    # 2. generate's force_task= on plain generation prompts appends the same tokens
    plain_batch = generation_batch(processor, [REGION, TEXT])
    forced = model.generate(**plain_batch, max_new_tokens=4, do_sample=False, logits_processor=banned,
                            force_task=["region", None])
    begin, slots = _ids(model, "region")
    prompt_len = plain_batch["input_ids"].shape[1]
    assert forced.sequences[0, prompt_len: prompt_len + 2].tolist() == [begin, *slots]
    assert forced.sequences[1, :2].tolist() == [pad, pad]  # the other row keeps left padding
    torch.testing.assert_close(forced.task_outputs[0]["region"]["boxes"], reference.pred_boxes)
    torch.testing.assert_close(forced.head_outputs.router_logits[0], reference.router_logits[0])
    assert forced.task_outputs[1] is None
    # the unforced row, moved by the appended tokens, still has the router read at its prompt's end
    with torch.no_grad():
        text_alone = model(**_right_padded(plain_batch, plain_batch["input_ids"], eos, pad))
    torch.testing.assert_close(forced.head_outputs.router_logits[1], text_alone.router_logits[1])
    with pytest.raises(ValueError, match=r"Sample 1: `force_task` 'depth' is not a task of this model"):
        model.generate(**plain_batch, max_new_tokens=1, force_task=[None, "depth"])


def test_left_padded_append_and_incomplete_slot_runs():
    tensor = torch.tensor([[0, 5, 6], [7, 8, 9]])
    out = append_to_left_padded(tensor, [torch.tensor([1]), torch.tensor([2, 3])], fill=0)
    assert out.tolist() == [[0, 0, 5, 6, 1], [7, 8, 9, 2, 3]]
    s0, s1 = 50, 51
    tokens = torch.tensor([[4, s0, s1, 4, s0], [s0, s1, s0, s1, 4]])
    assert incomplete_slot_runs(tokens, [s0, s1]).tolist() == [[False, False, False, False, True], [False] * 5]
    assert not incomplete_slot_runs(tokens, [s0]).any()


# ------------------------------------------------------------------------------------------------
# Tracking at model level
# ------------------------------------------------------------------------------------------------
def _sam2_frames(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, SAM2_SIZE, SAM2_SIZE, generator=generator)


def test_track_masks_gives_a_mask_and_box_per_frame_and_a_box_prompt_changes_them(llava):
    model, _ = llava
    frames = _sam2_frames(5)
    embeddings = torch.randn(2, 1, model.config.get_text_config().hidden_size)
    query_index = torch.tensor([0, 0, 0, 1, 1])
    results = model.track_masks(frames, query_index, task_embeddings=embeddings)
    assert [r["mask_logits"].shape for r in results] == [(3, SAM2_SIZE, SAM2_SIZE), (2, SAM2_SIZE, SAM2_SIZE)]
    for result in results:
        binary = result["mask_logits"] > 0
        assert result["boxes"].shape == (binary.shape[0], 4)
        torch.testing.assert_close(result["boxes_xyxy_sam2"], masks_to_boxes(binary))
        torch.testing.assert_close(result["boxes"], masks_to_boxes(binary) / SAM2_SIZE)
    # each query tracked on its own frames, from the head's mask of its first frame
    with torch.no_grad():
        head = model.mask_head(embeddings[1:], sam2_pixel_values=frames[3:4])["pred_mask_logits"]
    alone = model.track_masks(frames[3:], first_frame_mask_logits=head)[0]
    torch.testing.assert_close(alone["mask_logits"], results[1]["mask_logits"])
    boxed = model.track_masks(frames, query_index, task_embeddings=embeddings,
                              initial_boxes=[torch.tensor([0.1, 0.2, 0.6, 0.7]), None])
    assert not torch.allclose(boxed[0]["mask_logits"], results[0]["mask_logits"])
    # the box replaces the head's first-frame prompt: query 0 is tracked from the box alone
    from_box = model.track_masks(frames[:3], initial_boxes=[torch.tensor([0.1, 0.2, 0.6, 0.7])])[0]
    torch.testing.assert_close(boxed[0]["mask_logits"], from_box["mask_logits"])
    torch.testing.assert_close(boxed[1]["mask_logits"], results[1]["mask_logits"])  # no box: unchanged


def test_generate_with_an_initial_box_tracks_from_it(mixed):
    model, batch = mixed["model"], mixed["batch"]
    box = torch.tensor([0.2, 0.1, 0.7, 0.8])
    out = mixed["run"](mask_initial_boxes=[None, None, box, None, None])
    expected = model.track_masks(batch["sam2_pixel_values"][:3], initial_boxes=[box])[0]
    torch.testing.assert_close(out.task_outputs[2]["mask"]["mask_logits"][0], expected["mask_logits"])
    assert not torch.allclose(expected["mask_logits"], mixed["out"].task_outputs[2]["mask"]["mask_logits"][0])


def test_evaluator_tracks_video_masks(llava):
    model, processor = llava
    evaluator = TaskEvaluator(processor, [MASK_VIDEO, MASK_IMAGE], batch_size=2,
                              media_loader=lambda plan, targets: MEDIA["mv1" if plan["kind"] == "video" else "mi1"])
    predictions = evaluator.predict(model)
    video, image = predictions.mask
    assert video["tracked"] and not image["tracked"]
    assert len(video["pred"]) == 3 and all(m.shape == (FRAME_H, FRAME_W) for m in video["pred"])
    assert len(image["pred"]) == 1 and image["pred"][0].shape == (FRAME_H, FRAME_W) and "pred_boxes" not in image
    # the same as tracking by hand from the head's first-frame mask of a force_task forward pass
    batch = generation_batch(processor, [MASK_VIDEO], modes=["force_task"])
    sam2 = batch["sam2_pixel_values"]
    with torch.no_grad():
        first = model(**{k: v for k, v in batch.items() if k not in ("sam2_pixel_values", "mask_query_index",
                                                                     "mask_targets", "labels", "task_labels")},
                      sam2_pixel_values=sam2[:1]).mask_outputs["pred_mask_logits"]
    tracked = model.track_masks(sam2, first_frame_mask_logits=first)[0]
    expected = processor.post_process_masks(tracked["mask_logits"], [(FRAME_H, FRAME_W)] * 3)
    for got, want in zip(video["pred"], expected):
        assert np.array_equal(got, want["mask"])
    expected_boxes = processor.post_process_mask_boxes(tracked["boxes"], [(FRAME_H, FRAME_W)] * 3)
    np.testing.assert_allclose(video["pred_boxes"], expected_boxes)
    metrics = compute_task_metrics(predictions)
    assert 0.0 <= metrics["mask/j&f"] <= 1.0 and 0.0 <= metrics["mask/miou"] <= 1.0


def test_evaluator_per_frame_mode_prompts_every_video_frame(llava):
    """mask_video_mode="per_frame": no tracking; each frame's mask is the head's own on that frame."""
    model, processor = llava
    loader = lambda plan, targets: MEDIA["mv1" if plan["kind"] == "video" else "mi1"]  # noqa: E731
    video = TaskEvaluator(processor, [MASK_VIDEO], batch_size=1, media_loader=loader,
                          mask_video_mode="per_frame").predict(model).mask[0]
    assert not video["tracked"] and "pred_boxes" not in video and len(video["pred"]) == 3
    batch = generation_batch(processor, [MASK_VIDEO], modes=["force_task"])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("mask_targets", "labels", "task_labels")}
                       ).mask_outputs["pred_mask_logits"]
    expected = processor.post_process_masks(logits, [(FRAME_H, FRAME_W)] * 3)
    for got, want in zip(video["pred"], expected):
        assert np.array_equal(got, want["mask"])
    with pytest.raises(ValueError, match="Unknown mask_video_mode"):
        TaskEvaluator(processor, [MASK_VIDEO], mask_video_mode="track")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_mask_query_without_sam2_frames_names_the_sample(mixed):
    model, batch = mixed["model"], mixed["batch"]
    plan = mixed["plan"]
    force = ForceTokens(batch["input_ids"].shape[1], plan, model.generation_config.eos_token_id)
    without = {k: v for k, v in batch.items() if k not in ("sam2_pixel_values", "mask_query_index")}
    with pytest.raises(ValueError, match=r"Sample 2 asks for a mask \(<masks>\) but its video has 4 frame\(s\) for the "
                                         r"MLLM but no SAM2 frames"):
        model.generate(**without, max_new_tokens=3, logits_processor=LogitsProcessorList([force]))
    # SAM2 frames for the image sample only: the video sample is named
    only_image = {**without, "sam2_pixel_values": batch["sam2_pixel_values"][3:], "sam2_batch_index": torch.tensor([3])}
    with pytest.raises(ValueError, match=r"Sample 2 asks for a mask .* no SAM2 frames"):
        model.generate(**only_image, max_new_tokens=3, logits_processor=LogitsProcessorList([force]))


@pytest.mark.parametrize("box", [[0.2, 0.2, 1.5, 0.9], [-0.3, 0.0, 0.5, 0.5], [0.6, 0.2, 0.4, 0.9],
                                 [10.0, 5.0, 40.0, 30.0]])
def test_initial_box_outside_the_frame_is_refused(llava, box):
    model, processor = llava
    batch = generation_batch(processor, [TEXT, MASK_VIDEO])
    with pytest.raises(ValueError, match=r"Sample 1: the initial box .* is outside the frame or empty"):
        model.generate(**batch, max_new_tokens=1, mask_initial_boxes=[None, torch.tensor(box)])
    with pytest.raises(ValueError, match=r"Sample 4: the initial box .* is outside the frame"):
        model.track_masks(_sam2_frames(2), initial_boxes=[torch.tensor(box)], batch_index=[4])


def test_initial_boxes_need_propagation_and_one_entry_per_prompt(llava):
    model, processor = llava
    batch = generation_batch(processor, [TEXT, MASK_VIDEO])
    box = torch.tensor([0.1, 0.1, 0.5, 0.5])
    with pytest.raises(ValueError, match="tracking prompts: use them with mask_video_mode='propagate'"):
        model.generate(**batch, max_new_tokens=1, mask_video_mode="per_frame", mask_initial_boxes=[None, box])
    with pytest.raises(ValueError, match=r"1 entries for 2 prompts"):
        model.generate(**batch, max_new_tokens=1, mask_initial_boxes=[box])
    with pytest.raises(ValueError, match="Unknown mask_video_mode 'track'"):
        model.generate(**batch, max_new_tokens=1, mask_video_mode="track")


@pytest.fixture(scope="module")
def box_prompted():
    return build_model_and_processor("llava", tasks=("mask",),
                                     mask_head_config={"box_prompt": True, "box_prompt_config": {"heatmap_dim": 16}})


def _box_batch(processor, modes, media, padding_side):
    encoded = [processor.encode(s, mode=m) for s, m in zip((MASK_VIDEO, MASK_IMAGE), modes)]
    batch = collate_encoded(processor, encoded, media, padding_side=padding_side)
    batch.pop("tpo_meta")
    return batch


BOX_MEDIA = [{**MEDIA["mv1"], "sam2_timestamps": [0.4, 1.6, 3.4]}, MEDIA["mi1"]]


def test_box_prompt_reads_the_frame_of_each_sam2_image_and_trains(box_prompted):
    """Each SAM2 image's box prompt comes from the visual tokens of its own head frame (nearest in time);
    training adds the `mask_box` terms and trains the localiser."""
    model, processor = box_prompted
    assert "mask_head.localiser" in model.task_module_names()
    batch = _box_batch(processor, ["train", "train"], BOX_MEDIA, "right")
    assert batch["mask_frame_index"].tolist() == [0, 1, 3, -1]  # head frames at 0.5, 1.5, 2.5, 3.5 s
    torch.testing.assert_close(batch["mask_view_to_sam2"], torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 4))
    model.train()
    out = model(**batch)
    assert {"mask_box", "mask_box_l1", "mask_box_giou", "mask_box_heatmap"} <= set(out.loss_dict)
    out.loss.backward()
    assert model.mask_head.localiser.score[1].weight.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        boxes = model(**batch).mask_outputs["prompt_boxes_xyxy_sam2"]
        moved = model(**{**batch, "mask_frame_index": torch.tensor([2, 1, 3, -1])}).mask_outputs
    assert boxes.shape == (4, 4) and bool((boxes[:, 2:] >= boxes[:, :2]).all())
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= SAM2_SIZE
    assert not torch.allclose(moved["prompt_boxes_xyxy_sam2"][0], boxes[0])  # another frame's tokens
    with torch.no_grad():  # image 0 reading image 1's head frame: image 1's box (same query, same view mapping)
        shared = model(**{**batch, "mask_frame_index": torch.tensor([1, 1, 3, -1])}).mask_outputs
    torch.testing.assert_close(shared["prompt_boxes_xyxy_sam2"][0], boxes[1])
    torch.testing.assert_close(moved["prompt_boxes_xyxy_sam2"][1:], boxes[1:])


def test_box_prompt_teacher_forcing_gives_sam2_the_gt_box_in_training_only(box_prompted):
    """`box_prompt_teacher_forcing: 1.0`: in training every SAM2 image showing its object is prompted with its GT
    mask's box (SAM2 input pixels); evaluation, and a rate of 0, keep the localiser's boxes."""
    model, processor = box_prompted
    batch = _box_batch(processor, ["train", "train"], BOX_MEDIA, "right")
    binary = batch["mask_targets"] > 0.5
    height, width = binary.shape[-2:]
    expected = masks_to_boxes(binary).float() / torch.tensor([width, height, width, height]) * SAM2_SIZE
    shows = binary.flatten(1).any(-1)
    assert bool(shows.any())
    settings = model.mask_head.settings
    try:
        model.eval()
        with torch.no_grad():
            localised = model(**batch).mask_outputs["prompt_boxes_xyxy_sam2"]
        model.train()
        model.mask_head.settings = dataclasses.replace(settings, box_prompt_teacher_forcing=1.0)
        with torch.no_grad():
            forced = model(**batch).mask_outputs["prompt_boxes_xyxy_sam2"]
        torch.testing.assert_close(forced[shows], expected[shows])
        torch.testing.assert_close(forced[~shows], localised[~shows])
        assert not torch.allclose(localised[shows], expected[shows])  # the untrained localiser's boxes differ
        model.mask_head.settings = dataclasses.replace(settings, box_prompt_teacher_forcing=0.0)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).mask_outputs["prompt_boxes_xyxy_sam2"], localised)
        model.eval()
        model.mask_head.settings = dataclasses.replace(settings, box_prompt_teacher_forcing=1.0)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).mask_outputs["prompt_boxes_xyxy_sam2"], localised)
    finally:
        model.mask_head.settings = settings
        model.eval()


def test_box_bound_masks_stay_inside_the_box_sam2_was_prompted_with(box_prompted):
    """`box_bounds_mask`: in training (GT boxes forced) and in evaluation (the localiser's boxes), every mask's logits
    outside the box prompt it was given (grown by the margin) are background, and the rest is what SAM2 predicts."""
    model, processor = box_prompted
    batch = _box_batch(processor, ["train", "train"], BOX_MEDIA, "right")
    settings = model.mask_head.settings
    try:
        for training, forcing in ((True, 1.0), (False, 0.0)):
            model.train(training)
            model.mask_head.settings = dataclasses.replace(settings, box_prompt_teacher_forcing=forcing)
            torch.manual_seed(0)
            with torch.no_grad():
                free = model(**batch).mask_outputs
            model.mask_head.settings = dataclasses.replace(settings, box_prompt_teacher_forcing=forcing,
                                                           box_bounds_mask=True, box_bound_margin=0.25)
            torch.manual_seed(0)
            with torch.no_grad():
                bounded = model(**batch).mask_outputs
            boxes = bounded["prompt_boxes_xyxy_sam2"]
            torch.testing.assert_close(boxes, free["prompt_boxes_xyxy_sam2"])
            expected = bound_to_boxes(free["pred_mask_logits"], boxes, SAM2_SIZE, 0.25)
            torch.testing.assert_close(bounded["pred_mask_logits"], expected)
            assert bool((expected == OUTSIDE_BOX_LOGIT).any()) and bool((expected != OUTSIDE_BOX_LOGIT).any())
    finally:
        model.mask_head.settings = settings
        model.eval()


def test_box_prompt_maps_view_coordinates_to_sam2(box_prompted):
    """`mask_view_to_sam2` (a_x, b_x, a_y, b_y) moves the prompt box: x_sam2 = a_x * x + b_x."""
    model, processor = box_prompted
    batch = _box_batch(processor, ["force_task", "force_task"], BOX_MEDIA, "right")
    transform = torch.tensor([[0.5, 0.25, 2.0, -0.5]]).expand(4, 4)
    with torch.no_grad():
        plain = model(**batch).mask_outputs["prompt_boxes_xyxy_sam2"]
        shifted = model(**{**batch, "mask_view_to_sam2": transform}).mask_outputs["prompt_boxes_xyxy_sam2"]
    view = plain / SAM2_SIZE
    expected = torch.stack([0.5 * view[:, 0] + 0.25, 2.0 * view[:, 1] - 0.5, 0.5 * view[:, 2] + 0.25,
                            2.0 * view[:, 3] - 0.5], -1)
    torch.testing.assert_close(shifted, expected.clamp(0, 1) * SAM2_SIZE)


def test_generate_with_box_prompts_tracks_videos_and_equals_a_plain_forward_on_images(box_prompted):
    model, processor = box_prompted
    batch = _box_batch(processor, ["force_task", "force_task"], BOX_MEDIA, "left")
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    video, image = out.task_outputs[0]["mask"], out.task_outputs[1]["mask"]
    assert video["mode"] == ["propagate"] and video["mask_logits"][0].shape == (3, SAM2_SIZE, SAM2_SIZE)
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    with torch.no_grad():
        sam2 = {k: batch[k] for k in ("sam2_pixel_values", "mask_query_index", "mask_frame_index", "mask_view_to_sam2")}
        reference = model(**_right_padded(batch, batch["input_ids"], eos, pad), **sam2).mask_outputs
    torch.testing.assert_close(image["mask_logits"][0], reference["pred_mask_logits"][3:])
    # the video is tracked from the box-prompted mask of its first frame
    tracked = model.track_masks(batch["sam2_pixel_values"][:3], first_frame_mask_logits=reference["pred_mask_logits"][:1])
    torch.testing.assert_close(video["mask_logits"][0], tracked[0]["mask_logits"])


def test_evaluator_tracks_box_prompted_video_masks(box_prompted):
    """Issue 15 §9: with the box prompt, the evaluator's first-frame pass keeps the box prompt's per-image
    inputs of the first frame only (it crashed with 3 frame indices for 1 SAM2 image), then propagates."""
    model, processor = box_prompted
    media = {"video": BOX_MEDIA[0], "image": BOX_MEDIA[1]}
    evaluator = TaskEvaluator(processor, [MASK_VIDEO, MASK_IMAGE], batch_size=2, mask_video_mode="propagate",
                              media_loader=lambda plan, targets: media[plan["kind"]])
    video, image = evaluator.predict(model).mask
    assert video["tracked"] and len(video["pred"]) == 3 and not image["tracked"]
    batch = _box_batch(processor, ["force_task", "force_task"], BOX_MEDIA, "right")
    first_only = {k: batch[k][[0, 3]] for k in ("sam2_pixel_values", "mask_query_index", "mask_frame_index",
                                                "mask_view_to_sam2")}
    plain = {k: v for k, v in batch.items() if k not in (*first_only, "mask_targets", "labels", "task_labels")}
    with torch.no_grad():
        first = model(**plain, **first_only).mask_outputs
    assert first["prompt_boxes_xyxy_sam2"].shape == (2, 4)  # the box prompt ran on the first frame's tokens
    tracked = model.track_masks(batch["sam2_pixel_values"][:3], first_frame_mask_logits=first["pred_mask_logits"][:1])
    expected = processor.post_process_masks(tracked[0]["mask_logits"], [(FRAME_H, FRAME_W)] * 3)
    assert all(np.array_equal(got, want["mask"]) for got, want in zip(video["pred"], expected))
    with pytest.raises(ValueError, match="`mask_frame_index` has 4 rows for 2 SAM2 images"):
        model(**plain, **{**first_only, "mask_frame_index": batch["mask_frame_index"]})


def test_heads_reuse_decoding_hidden_states_and_fall_back_to_a_forward(mixed):
    """With a KV cache the heads read the hidden states decoding computed (no extra backbone call); without
    one (each step re-encodes) they run one forward pass; both give the same head outputs."""
    model = mixed["model"]
    calls = []
    handle = model.mllm.base_model.register_forward_hook(lambda module, args, output: calls.append(args))
    try:
        cached = mixed["run"]()
        steps = cached.sequences.shape[1] - mixed["batch"]["input_ids"].shape[1]
        assert len(calls) == steps  # prefill + (steps - 1) cached steps, no heads' pass
        calls.clear()
        uncached = mixed["run"](use_cache=False)
        assert len(calls) == steps + 1  # the heads' pass runs the backbone
    finally:
        handle.remove()
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.task_outputs[0]["region"]["boxes"], uncached.task_outputs[0]["region"]["boxes"])
    torch.testing.assert_close(cached.task_outputs[1]["temporal"]["saliency"],
                               uncached.task_outputs[1]["temporal"]["saliency"])
    torch.testing.assert_close(cached.task_outputs[3]["mask"]["mask_logits"][0],
                               uncached.task_outputs[3]["mask"]["mask_logits"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached.head_outputs.router_logits, uncached.head_outputs.router_logits)
