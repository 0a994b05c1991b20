"""Task evaluation of a TPO model on samples of the common schema, with the official metrics.

Grounding samples (temporal, region, mask) run once in "force_task" mode: the prompt ends with the
task's begin and slot tokens, so one forward pass gives the auxiliary router's choice, the head's
prediction, and the LM's own choice of task: the logits at the last prompt token, which under causal
attention are exactly the first step of greedy generation from the bare prompt (`router/end_to_end_accuracy`:
the task whose begin token the LM emits first, or text).
Video mask samples are scored on every annotated frame: "propagate" segments the first frame with the mask
head and tracks it through SAM2's video memory (`TPOForConditionalGeneration.track_masks`); "per_frame"
prompts every frame with the head. Conversation samples are answered with `generate` (greedy); multiple-
choice answers are scored by their option letter (`mcqa/accuracy`) and, without generating, by the option whose
text the model finds most likely as the answer (`mcqa/ranked_accuracy`, rank classification); a text prompt
routes right when its answer is text and not empty. Grounding tasks the processor answers in text coordinates
(`text_coordinate_tasks`) are generated the same way and parsed (`TPOProcessor.parse_text_coordinates`); an answer without a well-formed box or span
scores as a miss and is counted (`<task>/unparseable_answers`).
Each grounding metric comes with its question-blind floor (`tpo.training.metrics.floors`) when the samples
list their media's objects, and query-swap controls (the same media asked about another object) are scored
like the test set. Predictions can be written in the benchmarks' formats (QVHighlights submission jsonl,
boxes, RLE masks, answers) for `examples/evaluate_tpo.py`.
"""

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..modeling_tpo.inputs_tpo import SAM2_IMAGE_INPUTS
from ..processing.collator_tpo import collate_encoded
from ..processing.pipeline import MediaError, load_media, probe_media
from ..processing.processing_tpo import IGNORE_INDEX, TASK_LABELS, decode_rle
from .metrics import (
    as_mask,
    best_gt_iou,
    j_and_f,
    mask_iou_metrics,
    mcqa_accuracy,
    qvhighlights_metrics,
    refcoco_accuracy,
    to_submission,
)
from .metrics.floors import (
    mask_object_choice,
    mask_query_blind_j_and_f,
    mask_query_blind_miou,
    mcqa_chance_accuracy,
    mcqa_constant_letter_accuracy,
    region_query_blind_accuracy,
    temporal_query_blind_recall,
)

logger = logging.getLogger(__name__)
REQUIRED_KEYS = ("temporal/r1@0.5", "temporal/miou", "highlight/hit@1", "region/acc@0.5", "mask/miou", "mask/j&f",
                 "router/end_to_end_accuracy", "router/accuracy", "mcqa/accuracy")
# A metric and the question-blind floor printed beside it.
FLOORS = {"region/acc@0.5": "floor/region_query_blind_acc@0.5", "temporal/r1@0.5": "floor/temporal_query_blind_r1@0.5",
          "mask/miou": "floor/mask_query_blind_miou", "mask/j&f": "floor/mask_query_blind_j&f",
          "mask/asked_first": "floor/mask_asked_first_chance"}
# Floors that need no objects: multiple-choice accuracy beside always answering the most frequent letter.
ANSWER_FLOORS = {"mcqa/accuracy": "floor/mcqa_majority_letter", "mcqa/ranked_accuracy": "floor/mcqa_chance"}
# What each metric means where the name alone does not say it (printed with the table).
NOTES = {
    "router/accuracy": "the auxiliary router classifier (L_assign), not what the LM emits",
    "router/end_to_end_accuracy": "the LM's first emitted token: the asked task's begin token, or non-empty text",
    "mask/j&f": "every annotated frame of each video",
    "mask/j&f_first_frame": "the first annotated frame of each video",
    "control/region_query_swap_acc@0.5": "the same image asked about another of its objects",
    "control/temporal_query_swap_r1@0.5": "the same video asked about another of its shapes",
    "control/mask_query_swap_miou": "the same image asked about another of its objects, answered with a mask",
    "mask/asked_first": "frames whose mask overlaps the asked object more than any other object (floor: chance)",
    "mask/union_miou": "IoU with the union of the visible objects: near 1 when every object is segmented",
    "mcqa/accuracy": "floor: always the most frequent answer letter of these questions",
    "mcqa/ranked_accuracy": "the option whose text the model finds most likely as the answer (floor: chance)",
}


@dataclass
class Predictions:
    """Everything predicted for one evaluation set, per task, in the benchmarks' units."""

    router: list[tuple[int, int]] = field(default_factory=list)  # auxiliary classifier: (predicted, expected)
    routing: list[dict] = field(default_factory=list)  # the LM's first token: {"id", "expected", "emitted", "text"}
    temporal: list[dict] = field(default_factory=list)
    region: list[dict] = field(default_factory=list)
    mask: list[dict] = field(default_factory=list)
    text: list[dict] = field(default_factory=list)
    unparseable: dict = field(default_factory=dict)  # text-coordinate answers without a readable box/span, per task


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class TaskEvaluator:
    """Callable `(model) -> metrics` for TPOTrainer, or run directly.

    Args:
        processor: the TPOProcessor.
        samples: rows of the common schema (a list or a `datasets.Dataset`), e.g. a test split.
        batch_size: samples per forward pass.
        max_new_tokens: answer length for conversation samples.
        max_coordinate_tokens: answer length for grounding samples answered in text coordinates (the processor's
            `text_coordinate_tasks`), which are generated and parsed instead of forced through the task tokens.
        media_loader: `(media_plan, targets) -> decoded media` (default: files through PyAV / PIL).
        output_dir: when given, predictions are written there in the benchmarks' formats.
        mask_video_mode: "propagate" (default): video mask samples are segmented on their first frame and
            tracked through SAM2's video memory; "per_frame": every frame is prompted by the task embedding
            alone (for a SAM2 whose memory was never trained, e.g. the randomly initialised tiny SAM2 of
            the embedded default).
        rank_options: also score multiple-choice questions by ranking their options' likelihood
            (`mcqa/ranked_accuracy`, beside `mcqa/accuracy` of the generated answer's letter).
        controls: {name: samples} evaluated like `samples`, their metrics reported as
            `control/<name>_<metric>` for the task the name starts with (e.g. "region_query_swap" gives
            `control/region_query_swap_acc@0.5`).

    A sample whose media cannot be read (here or when decoded) is skipped with a warning and counted:
    `eval/skipped_samples` in the metrics.
    """

    def __init__(self, processor, samples, batch_size: int = 16, max_new_tokens: int = 8, media_loader=load_media,
                 output_dir: str | None = None, mask_video_mode: str = "propagate", controls: dict | None = None,
                 max_coordinate_tokens: int = 40, rank_options: bool = True):
        if mask_video_mode not in ("propagate", "per_frame"):
            raise ValueError(f"Unknown mask_video_mode {mask_video_mode!r}; use 'propagate' or 'per_frame'.")
        self.mask_video_mode = mask_video_mode
        self.processor = processor
        self.probe_skipped = 0  # samples left out when probed here
        self.skipped = 0  # samples left out while decoding, in the last call
        self.samples = self._probed(samples)
        self.controls = {name: self._probed(rows) for name, rows in (controls or {}).items()}
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.max_coordinate_tokens = max_coordinate_tokens
        self.rank_options = rank_options
        self.media_loader = media_loader
        self.output_dir = output_dir

    def _probed(self, samples) -> list[dict]:
        """Samples with sizes and durations filled in; unreadable media skipped and counted."""
        probed = []
        for sample in samples:
            try:
                probed.append(probe_media(dict(sample)))
            except (MediaError, OSError, ValueError) as error:
                self.probe_skipped += 1
                logger.warning("Evaluation skips sample %r: %s", sample.get("id"), error)
        return probed

    @property
    def notes(self) -> dict[str, str]:
        """What the metrics mean, with the mask mode of this evaluator (for `format_table`)."""
        notes = dict(NOTES)
        for key in ("mask/j&f", "mask/j&f_first_frame"):
            notes[key] += f", {self.mask_video_mode} mode"
        return notes

    def __call__(self, model) -> dict[str, float]:
        self.skipped = 0
        predictions = self.predict(model)
        metrics = compute_task_metrics(predictions)
        for name, samples in self.controls.items():
            metrics.update(control_metrics(name, compute_task_metrics(self.predict(model, samples))))
        metrics["eval/skipped_samples"] = float(self.probe_skipped + self.skipped)
        if self.output_dir:
            write_predictions(predictions, self.output_dir)
        return metrics

    @torch.no_grad()
    def predict(self, model, samples: list[dict] | None = None) -> Predictions:
        """Predictions for `samples` (default: the evaluator's)."""
        samples = self.samples if samples is None else samples
        was_training = model.training
        model.eval()
        predictions = Predictions()
        try:
            in_text = set(getattr(self.processor, "text_coordinate_tasks", None) or [])  # generated and parsed
            grounding = [s for s in samples if s["task"] != "text" and s["task"] not in in_text]
            coordinates = [s for s in samples if s["task"] in in_text]
            text = [s for s in samples if s["task"] == "text"]
            for batch in _batches(grounding, self.batch_size):
                self._grounding_batch(model, batch, predictions)
            for batch in _batches(coordinates, self.batch_size):
                self._text_coordinate_batch(model, batch, predictions)
            for batch in _batches(text, self.batch_size):
                self._text_batch(model, batch, predictions)
        finally:
            model.train(was_training)
        return predictions

    # ---- batching -------------------------------------------------------------------------------
    def _encode(self, samples: list[dict], mode: str, padding_side: str):
        """Encoded batch, the samples kept (media decoded) and their encodings."""
        encoded, media, kept = [], [], []
        for sample in samples:
            try:
                item = self.processor.encode(sample, mode=mode)
                media.append(self.media_loader(item.media, item.targets))
            except (MediaError, ValueError) as error:
                self.skipped += 1
                logger.warning("Evaluation skips sample %r: %s", sample.get("id"), error)
                continue
            encoded.append(item)
            kept.append(sample)
        if not encoded:
            return None, [], []
        batch = collate_encoded(self.processor, encoded, media, padding_side=padding_side)
        return batch, kept, encoded

    @staticmethod
    def _to_device(batch: dict, model) -> dict:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        out = {}
        for key, value in batch.items():
            if not torch.is_tensor(value):
                out[key] = value
            elif value.is_floating_point() and key in ("pixel_values", "pixel_values_videos", "sam2_pixel_values"):
                out[key] = value.to(device=device, dtype=dtype)
            else:
                out[key] = value.to(device)
        return out

    def _grounding_batch(self, model, samples: list[dict], predictions: Predictions) -> None:
        batch, kept, encoded = self._encode(samples, "force_task", "right")
        if batch is None:
            return
        meta = batch.pop("tpo_meta")
        for key in ("labels", "region_boxes", "region_batch_index", "temporal_spans", "temporal_span_query_index",
                    "temporal_saliency", "mask_targets", "task_labels"):
            batch.pop(key, None)
        tracked = self._video_mask_frames(batch, encoded) if self.mask_video_mode == "propagate" else {}
        prompt_end = batch["instruction_end_index"]
        outputs = model(**self._to_device(batch, model))
        router = outputs.router_logits.argmax(-1).tolist()
        rows = torch.arange(len(kept), device=outputs.logits.device)
        first_tokens = outputs.logits[rows, prompt_end.to(outputs.logits.device)].argmax(-1).tolist()
        begin_tasks = task_of_begin_token(model)
        for sample, choice, token in zip(kept, router, first_tokens):
            predictions.router.append((choice, TASK_LABELS[sample["task"]]))
            predictions.routing.append({"id": sample["id"], "expected": sample["task"],
                                        "emitted": begin_tasks.get(token, "text"), "text": None})
        if outputs.pred_boxes is not None:
            sizes = [tuple(kept[b]["image_size"]) for b in outputs.pred_boxes_batch_index.tolist()]
            boxes = self.processor.post_process_boxes(outputs.pred_boxes, sizes)
            for b, box in zip(outputs.pred_boxes_batch_index.tolist(), boxes):
                sample = kept[b]
                objects = json.loads(sample.get("meta") or "{}").get("alternatives", {})
                predictions.region.append({"id": sample["id"], "pred_box": box, "gt_box": sample["boxes_xyxy_pixels"][0],
                                           "meta": sample.get("meta", "{}"), "alternatives": objects.get("boxes_xyxy_pixels")})
        if outputs.temporal_outputs:
            self._collect_temporal(model, outputs.temporal_outputs, kept, meta, predictions)
        if outputs.mask_outputs:
            self._collect_masks(model, outputs.mask_outputs, tracked, kept, encoded, predictions)

    def _collect_temporal(self, model, temporal: dict, kept: list[dict], meta: dict, predictions: Predictions) -> None:
        head = model.temporal_head
        windows = head.predict_windows(temporal)
        for q, b in enumerate(temporal["batch_index"].tolist()):
            sample = kept[b]
            duration = float(sample["duration_seconds"])
            frame_mask = temporal["frame_mask"][q]
            times = meta["head_frame_timestamps"][b]
            seconds = self.processor.post_process_spans([windows[q]], [duration])[0]
            saliency = temporal["pred_saliency"][q][frame_mask][None]
            clip_scores = self.processor.post_process_saliency(saliency, [times], [duration])[0]
            sample_meta = json.loads(sample.get("meta") or "{}")
            predictions.temporal.append({
                "id": sample["id"], "qid": sample_meta.get("qid", sample["id"]), "windows": seconds,
                "alternatives": sample_meta.get("alternative_windows"),
                "clip_scores": clip_scores, "gt_windows": [list(w) for w in sample["spans_seconds"]],
                "duration": duration, "relevant_clip_ids": list(sample["saliency_clip_ids"]),
                "saliency_scores": [list(s) for s in sample["saliency_scores"]],
            })

    @staticmethod
    def _video_mask_frames(batch: dict, encoded: list) -> dict[int, torch.Tensor]:
        """SAM2 frames (T, 3, S, S) of each video mask query with several frames, for tracking; only the
        first frame of such a query stays in `batch` (the head segments it, SAM2's memory the others).
        Mask query q is the q-th sample with mask targets (the collator's `mask_query_index`)."""
        pixels = batch.get("sam2_pixel_values")
        if pixels is None:
            return {}
        query_index = batch["mask_query_index"]
        mask_samples = [e for e in encoded if "masks_rle" in e.targets]
        tracked, keep = {}, []
        for q, item in enumerate(mask_samples):
            rows = (query_index == q).nonzero().flatten()
            if item.media.get("kind") == "video" and rows.numel() > 1:
                tracked[q] = pixels[rows]
                rows = rows[:1]
            keep.append(rows)
        keep = torch.cat(keep)
        for key in SAM2_IMAGE_INPUTS:  # the box prompt's frame index and view map too, one row per SAM2 image
            if batch.get(key) is not None:
                batch[key] = batch[key][keep]
        return tracked

    def _collect_masks(self, model, masks: dict, tracked: dict[int, torch.Tensor], kept: list[dict], encoded: list,
                       predictions: Predictions) -> None:
        """Masks at the original size per query; video queries in `tracked` are propagated from the head's
        first-frame mask through their SAM2 frames (their per-frame boxes are kept as `pred_boxes`)."""
        query_index = masks["query_index"].tolist()
        logits = masks["pred_mask_logits"]
        for q, b in enumerate(masks["batch_index"].tolist()):
            sample = kept[b]
            rows = [i for i, qi in enumerate(query_index) if qi == q]
            height, width = sample["image_size"]
            query_logits, boxes = logits[rows], None
            if q in tracked:
                frames = self._to_device({"sam2_pixel_values": tracked[q]}, model)["sam2_pixel_values"]
                track = model.track_masks(frames, first_frame_mask_logits=query_logits[:1], batch_index=[b])[0]
                query_logits = track["mask_logits"]
                boxes = self.processor.post_process_mask_boxes(track["boxes"], [(height, width)] * len(query_logits))
            binary = self.processor.post_process_masks(query_logits, [(height, width)] * len(query_logits),
                                                       return_rle=True)
            plan_targets = encoded[b].targets
            gt = [decode_rle(r) for r in plan_targets.get("masks_rle", [])]
            entry = {"id": sample["id"], "video": sample["media_type"] != "image", "tracked": q in tracked,
                     "pred": [m["mask"] for m in binary], "pred_rle": [m["rle"] for m in binary],
                     "gt": gt, "frames": plan_targets.get("mask_frames", []),
                     "alternatives": _mask_alternatives(sample, plan_targets.get("mask_frames", []))}
            if boxes is not None:
                entry["pred_boxes"] = boxes
            predictions.mask.append(entry)

    def _generate(self, model, samples: list[dict], max_new_tokens: int) -> list[tuple]:
        """Greedy answers to bare prompts: per kept sample (sample, router choice, answer text, new token ids)."""
        batch, kept, _ = self._encode(samples, "generate", "left")
        if batch is None:
            return []
        batch.pop("tpo_meta")
        for key in ("labels", "task_labels"):
            batch.pop(key, None)
        inputs = self._to_device(batch, model)
        router = model(**inputs).router_logits.argmax(-1).tolist()
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   return_dict_in_generate=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        answers = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return list(zip(kept, router, answers, new_tokens.tolist()))

    def _text_batch(self, model, samples: list[dict], predictions: Predictions) -> None:
        begin_tasks = task_of_begin_token(model)
        ranked = self._ranked_options(model, [s for s in samples if len(s["options"])]) if self.rank_options else {}
        for sample, choice, answer, tokens in self._generate(model, samples, self.max_new_tokens):
            predictions.router.append((choice, TASK_LABELS["text"]))
            emitted = begin_tasks.get(tokens[0], "text") if tokens else "text"
            predictions.routing.append({"id": sample["id"], "expected": "text", "emitted": emitted,
                                        "text": answer.strip()})
            reference = next((t["content"] for t in reversed(sample["conversations"]) if t["role"] == "assistant"), "")
            meta = json.loads(sample.get("meta") or "{}")
            predictions.text.append({"id": sample["id"], "prediction": answer.strip(), "reference": reference,
                                     "options": list(sample["options"]), "answer": sample["answer"],
                                     "category": meta.get("category"), "held_out": meta.get("held_out"),
                                     **({"ranked_choice": ranked[sample["id"]]} if sample["id"] in ranked else {})})

    def _ranked_options(self, model, samples: list[dict]) -> dict[str, str]:
        """{sample id: letter of the option the model finds most likely as the answer} for multiple-choice
        samples: every option's text in place of the reference answer, scored by the sum of the log-probabilities
        of its tokens (rank classification, as lm-evaluation-harness scores multiple choice: no format to follow,
        no letter to copy). Each sample's media are decoded once for all of its options."""
        scores: dict[str, list[float]] = {}
        for chunk in _batches(samples, max(1, self.batch_size // 4)):
            encoded, media, owners = [], [], []
            for sample in chunk:
                try:
                    items = [self.processor.encode(_answered_with(sample, option), mode="train")
                             for option in sample["options"]]
                    decoded = self.media_loader(items[0].media, items[0].targets)
                except (MediaError, ValueError) as error:
                    logger.warning("Ranking the options skips sample %r: %s", sample.get("id"), error)
                    continue
                for index, item in enumerate(items):
                    encoded.append(item)
                    media.append(decoded)
                    owners.append((sample["id"], sample["options"][index]))
            if not encoded:
                continue
            batch = collate_encoded(self.processor, encoded, media, padding_side="right")
            batch.pop("tpo_meta")
            labels = batch.pop("labels")
            batch.pop("task_labels", None)
            logits = model(**self._to_device(batch, model)).logits.float()
            for row, (sample_id, option) in enumerate(owners):
                scores.setdefault(sample_id, []).append(
                    self._answer_log_likelihood(logits[row], labels[row].to(logits.device), option))
        return {sample_id: chr(ord("A") + int(np.argmax(values))) for sample_id, values in scores.items()}

    def _answer_log_likelihood(self, logits: torch.Tensor, labels: torch.Tensor, answer: str) -> float:
        """Sum of log p(token) over the answer's own tokens: the labelled tokens up to the answer's text (the
        end-of-turn tokens after it are left out). logits (seq, vocab), labels (seq,) aligned with input_ids."""
        positions = (labels != IGNORE_INDEX).nonzero().flatten()
        positions = positions[positions > 0]  # a token is predicted by the logits of the one before it
        breaks = (positions[1:] - positions[:-1] > 1).nonzero().flatten()
        if len(breaks):  # earlier assistant turns are labelled too: the last turn's run of tokens
            positions = positions[int(breaks[-1]) + 1:]
        tokens = labels[positions]
        count = len(positions)
        for k in range(1, len(positions) + 1):
            if len(self.processor.tokenizer.decode(tokens[:k].tolist()).strip()) >= len(answer.strip()):
                count = k
                break
        log_probs = torch.log_softmax(logits[positions[:count] - 1], dim=-1)
        return float(log_probs.gather(-1, tokens[:count, None]).sum())

    def _text_coordinate_batch(self, model, samples: list[dict], predictions: Predictions) -> None:
        """Grounding samples answered in text coordinates: generated (greedy), parsed by the processor and scored
        with the same metrics; an answer without a well-formed box or span is a miss, counted per task."""
        begin_tasks = task_of_begin_token(model)
        for sample, choice, answer, tokens in self._generate(model, samples, self.max_coordinate_tokens):
            task, parsed = sample["task"], self.processor.parse_text_coordinates(sample["task"], answer)
            predictions.router.append((choice, TASK_LABELS["text"]))
            predictions.routing.append({"id": sample["id"], "expected": "text", "text": answer.strip(),
                                        "emitted": begin_tasks.get(tokens[0], "text") if tokens else "text"})
            predictions.unparseable[task] = predictions.unparseable.get(task, 0) + int(parsed is None)
            sample_meta = json.loads(sample.get("meta") or "{}")
            if task == "region":
                predictions.region.append({"id": sample["id"], "pred_box": parsed, "gt_box": sample["boxes_xyxy_pixels"][0],
                                           "meta": sample.get("meta", "{}"), "answer": answer.strip(),
                                           "alternatives": sample_meta.get("alternatives", {}).get("boxes_xyxy_pixels")})
                continue
            predictions.temporal.append({
                "id": sample["id"], "qid": sample_meta.get("qid", sample["id"]), "answer": answer.strip(),
                "windows": [[start, end, 1.0] for start, end in parsed or []], "clip_scores": [],  # no saliency in text
                "alternatives": sample_meta.get("alternative_windows"), "gt_windows": [list(w) for w in sample["spans_seconds"]],
                "duration": float(sample["duration_seconds"]), "relevant_clip_ids": list(sample["saliency_clip_ids"]),
                "saliency_scores": [list(v) for v in sample["saliency_scores"]],
            })


def _answered_with(sample: dict, answer: str) -> dict:
    """The sample with `answer` as its last assistant turn (its question and media unchanged)."""
    turns = [dict(turn) for turn in sample["conversations"]]
    answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    if not answers:  # a question without its reference answer
        return {**sample, "conversations": [*turns, {"role": "assistant", "content": answer}]}
    turns[answers[-1]]["content"] = answer
    return {**sample, "conversations": turns[: answers[-1] + 1]}


def task_of_begin_token(model) -> dict[int, str]:
    """{begin token id: task} of the model's enabled tasks."""
    token_ids = getattr(model.config, "task_token_ids", None) or {}
    return {int(entry["begin"]): task for task, entry in token_ids.items()}


def _mask_alternatives(sample: dict, frames: list[int]) -> list[list] | None:
    """Every object of the sample's media on its evaluated frames (`meta["alternatives"]["masks_rle"]`: per
    object one RLE for an image, or per annotated frame an RLE or None for a video), or None."""
    objects = json.loads(sample.get("meta") or "{}").get("alternatives", {}).get("masks_rle")
    if objects is None:
        return None
    if sample["media_type"] == "image":
        return [[rle] for rle in objects]
    position = {int(f): i for i, f in enumerate(sample["mask_frame_indices"])}
    return [[masks[position[f]] if f in position else None for f in frames] for masks in objects]


def control_metrics(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """A control set's metrics of the task its name starts with, as `control/<name>_<metric>`."""
    task = name.split("_")[0]
    return {f"control/{name}_{key.split('/', 1)[1]}": value for key, value in metrics.items()
            if key.startswith(f"{task}/")}


def compute_task_metrics(predictions: Predictions) -> dict[str, float]:
    """The metrics of every task present (keys `task/metric`, percentages as fractions in [0, 1]), with the
    question-blind floors (`floor/...`) where every sample of a task lists its media's objects."""
    metrics: dict[str, float] = {}
    if predictions.router:
        chosen, expected = np.array(predictions.router).T
        metrics["router/accuracy"] = float(np.mean(chosen == expected))
    if predictions.routing:
        metrics.update(_routing_metrics(predictions.routing))
    if predictions.region:
        region = refcoco_accuracy([p["pred_box"] for p in predictions.region], [p["gt_box"] for p in predictions.region])
        metrics["region/acc@0.5"] = region["Acc@0.5"] / 100
        metrics["region/miou"] = region["mIoU"] / 100
        if all(p.get("alternatives") for p in predictions.region):
            metrics[FLOORS["region/acc@0.5"]] = region_query_blind_accuracy(
                [p["gt_box"] for p in predictions.region], [p["alternatives"] for p in predictions.region])
    if predictions.temporal:
        metrics.update(_temporal_metrics(predictions.temporal))
        if all(p.get("alternatives") for p in predictions.temporal):
            metrics[FLOORS["temporal/r1@0.5"]] = temporal_query_blind_recall(
                [p["gt_windows"] for p in predictions.temporal], [p["alternatives"] for p in predictions.temporal])
    for task, count in predictions.unparseable.items():
        metrics[f"{task}/unparseable_answers"] = float(count)  # scored as misses above
    if predictions.mask:
        metrics.update(_mask_metrics(predictions.mask))
    if predictions.text:
        metrics.update(_conversation_metrics(predictions.text))
        mcq = [p for p in predictions.text if p["options"]]
        if mcq:
            metrics["floor/mcqa_chance"] = mcqa_chance_accuracy([p["options"] for p in mcq])
            metrics[ANSWER_FLOORS["mcqa/accuracy"]] = mcqa_constant_letter_accuracy([p["answer"] for p in mcq])
        for category in sorted({p["category"] for p in predictions.text if p.get("category")}):
            metrics.update(_conversation_metrics([p for p in predictions.text if p.get("category") == category],
                                                 f"_{category}"))
        for held_out, name in ((True, "_held_out"), (False, "_seen")):
            metrics.update(_conversation_metrics([p for p in predictions.text if p.get("held_out") is held_out], name))
    return metrics


def _conversation_metrics(text: list[dict], suffix: str = "") -> dict[str, float]:
    """`mcqa/accuracy<suffix>` of the multiple-choice answers (their option letter) and `text/exact_match<suffix>`
    of the open-ended ones (case and a final period ignored), over the given predictions."""
    out = {}
    mcq = [p for p in text if p["options"]]
    if mcq:
        out[f"mcqa/accuracy{suffix}"] = mcqa_accuracy([p["prediction"] for p in mcq], [p["answer"] for p in mcq],
                                                      [p["options"] for p in mcq])["accuracy"] / 100
        ranked = [p for p in mcq if "ranked_choice" in p]
        if ranked:
            out[f"mcqa/ranked_accuracy{suffix}"] = float(np.mean([
                p["ranked_choice"] == p["answer"].strip().upper() for p in ranked]))
    open_ended = [p for p in text if not p["options"]]
    if open_ended:
        out[f"text/exact_match{suffix}"] = float(np.mean([
            p["prediction"].lower().strip(" .") == p["reference"].lower().strip(" .") for p in open_ended]))
    return out


def _routing_metrics(routing: list[dict]) -> dict[str, float]:
    """End-to-end routing: right when the LM's first token opens the asked task; for a text prompt, when it
    answers in text and the answer is not empty."""
    right = [r["emitted"] == r["expected"] and (r["expected"] != "text" or bool(r["text"])) for r in routing]
    out = {"router/end_to_end_accuracy": float(np.mean(right))}
    text = [r for r in routing if r["expected"] == "text"]
    if text:
        out["router/empty_text_answers"] = float(np.mean([r["emitted"] == "text" and not r["text"] for r in text]))
    return out


def _mask_metrics(masks: list[dict]) -> dict[str, float]:
    """gIoU / cIoU over every scored frame (images and video frames alike), J&F over the videos (all annotated
    frames, and the first frame alone), and the floors where every sample lists its media's objects. Every mask
    is decoded once."""
    scored = [{"pred": [_decoded(m) for m in p["pred"][: len(p["gt"])]], "gt": [_decoded(m) for m in p["gt"]],
               "video": p["video"], "objects": [[_decoded(m) for m in obj] for obj in p.get("alternatives") or []]}
              for p in masks if p["gt"]]
    out: dict[str, float] = {}
    if not scored:
        return out
    ious = mask_iou_metrics([m for p in scored for m in p["pred"]], [m for p in scored for m in p["gt"]])
    out["mask/miou"], out["mask/ciou"] = ious["gIoU"] / 100, ious["cIoU"] / 100
    with_objects = all(p["objects"] for p in scored)
    if with_objects:
        out[FLOORS["mask/miou"]] = mask_query_blind_miou([p["gt"] for p in scored], [p["objects"] for p in scored])
        choice = mask_object_choice([p["pred"] for p in scored], [p["gt"] for p in scored],
                                    [p["objects"] for p in scored])
        if choice:
            out["mask/asked_first"], out["mask/union_miou"] = choice["asked_first"], choice["union_miou"]
            out[FLOORS["mask/asked_first"]] = choice["asked_first_chance"]
    videos = [p for p in scored if p["video"]]
    if videos:
        out["mask/j&f"] = j_and_f([p["pred"] for p in videos], [p["gt"] for p in videos])["J&F"] / 100
        out["mask/j&f_first_frame"] = j_and_f([p["pred"][:1] for p in videos], [p["gt"][:1] for p in videos])["J&F"] / 100
        if with_objects:
            out[FLOORS["mask/j&f"]] = mask_query_blind_j_and_f([p["gt"] for p in videos], [p["objects"] for p in videos])
    return out


def _decoded(mask):
    """A bool mask from an RLE, None kept (an empty mask for the metrics)."""
    return None if mask is None else as_mask(mask)


def _temporal_metrics(temporal: list[dict]) -> dict[str, float]:
    top1 = [p["windows"][0][:2] if p["windows"] else None for p in temporal]
    best = best_gt_iou(top1, [p["gt_windows"] for p in temporal])
    out = {"temporal/r1@0.3": float(np.mean(best >= 0.3)), "temporal/r1@0.5": float(np.mean(best >= 0.5)),
           "temporal/r1@0.7": float(np.mean(best >= 0.7)), "temporal/miou": float(np.mean(best))}
    submission = [to_submission(p["qid"], p["windows"], p["clip_scores"]) for p in temporal]
    ground_truth = [{"qid": p["qid"], "duration": p["duration"], "relevant_windows": p["gt_windows"],
                     "relevant_clip_ids": p["relevant_clip_ids"], "saliency_scores": p["saliency_scores"]}
                    for p in temporal]
    official = qvhighlights_metrics(submission, ground_truth)
    out["temporal/mAP"] = official["MR-full-mAP"] / 100
    if any(p["saliency_scores"] for p in temporal) and all(p["clip_scores"] for p in temporal):
        out["highlight/map"] = official["HL-min-VeryGood-mAP"] / 100
        out["highlight/hit@1"] = official["HL-min-VeryGood-Hit1"] / 100
    return {k: v for k, v in out.items() if math.isfinite(v)}


def write_predictions(predictions: Predictions, output_dir: str) -> dict[str, str]:
    """Predictions in the benchmarks' formats; returns {kind: path}."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    if predictions.temporal:
        path = root / "qvhighlights_submission.jsonl"
        path.write_text("".join(json.dumps(to_submission(p["qid"], p["windows"], p["clip_scores"])) + "\n"
                                for p in predictions.temporal), encoding="utf-8")
        paths["temporal"] = str(path)
    if predictions.region:
        path = root / "region_predictions.json"
        path.write_text(json.dumps([{"id": p["id"], "bbox_xyxy": p["pred_box"]} for p in predictions.region], indent=1),
                        encoding="utf-8")
        paths["region"] = str(path)
    if predictions.mask:
        path = root / "mask_predictions.json"
        path.write_text(json.dumps([{"id": p["id"], "frames": p["frames"], "masks": p["pred_rle"]}
                                    for p in predictions.mask]), encoding="utf-8")
        paths["mask"] = str(path)
    if predictions.text:
        path = root / "answers.json"
        path.write_text(json.dumps([{"id": p["id"], "prediction": p["prediction"]} for p in predictions.text], indent=1),
                        encoding="utf-8")
        paths["text"] = str(path)
    return paths


def format_table(metrics: dict[str, float], notes: dict[str, str] | None = None) -> str:
    """A table of the metrics, required keys first, each grounding metric with its question-blind floor
    beside it (and the margin above it), then the controls and the rest; `notes` explain metrics."""
    notes = NOTES if notes is None else notes
    floor_of = {**FLOORS, **ANSWER_FLOORS}
    floors = {floor_of[key] for key in metrics if key in floor_of}  # printed beside their metric
    main = [k for k in REQUIRED_KEYS if k in metrics]
    controls = sorted(k for k in metrics if k.startswith("control/"))
    rest = sorted(k for k in metrics if k not in main and k not in controls and k not in floors)
    width = max([len(k) for k in main + controls + rest] + [10])
    lines = [f"{'metric':<{width}}  value   floor   above   ", f"{'-' * width}  ------  ------  ------"]
    for key in main + controls + rest:
        floor = metrics.get(floor_of.get(key, ""))
        beside = f"{floor:.4f}  {metrics[key] - floor:+.3f}" if floor is not None else " " * 14
        note = f"  {notes[key]}" if key in notes else ""
        lines.append(f"{key:<{width}}  {metrics[key]:.4f}  {beside}{note}".rstrip())
    lines.append("floor: a question-blind oracle (a random object of the same image or video, answered exactly).")
    return "\n".join(lines)


def group_by_task(samples) -> dict[str, list]:
    groups = defaultdict(list)
    for sample in samples:
        groups[sample["task"]].append(sample)
    return dict(groups)
