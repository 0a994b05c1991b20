"""Task evaluation of a TPO model on samples of the common schema, with the official metrics.

Grounding samples (temporal, region, mask) run once in "force_task" mode: the prompt ends with the
task's begin and slot tokens, so one forward pass gives the router's choice and the head's prediction.
Video mask samples are measured with tracking: the mask head segments the first of their SAM2 frames and
SAM2's video memory propagates that mask through the others (`TPOForConditionalGeneration.track_masks`),
so J&F measures the model as it is used on videos; image masks are the head's output as is.
Conversation samples are answered with `generate` (greedy); multiple-choice answers are scored by
their option letter. Predictions can be written in the benchmarks' formats (QVHighlights submission
jsonl, boxes, RLE masks, answers) for `examples/evaluate_tpo.py`.
"""

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..modeling_tpo.modeling_tpo import SAM2_IMAGE_INPUTS
from ..processing.collator_tpo import collate_encoded
from ..processing.pipeline import MediaError, load_media, probe_media
from ..processing.processing_tpo import TASK_LABELS, decode_rle
from .metrics import (
    best_gt_iou,
    j_and_f,
    mask_iou_metrics,
    mcqa_accuracy,
    qvhighlights_metrics,
    refcoco_accuracy,
    to_submission,
)

logger = logging.getLogger(__name__)
REQUIRED_KEYS = ("temporal/r1@0.5", "temporal/miou", "highlight/hit@1", "region/acc@0.5", "mask/miou",
                 "router/accuracy", "mcqa/accuracy")


@dataclass
class Predictions:
    """Everything predicted for one evaluation set, per task, in the benchmarks' units."""

    router: list[tuple[int, int]] = field(default_factory=list)  # (predicted, expected)
    temporal: list[dict] = field(default_factory=list)
    region: list[dict] = field(default_factory=list)
    mask: list[dict] = field(default_factory=list)
    text: list[dict] = field(default_factory=list)


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
        media_loader: `(media_plan, targets) -> decoded media` (default: files through PyAV / PIL).
        output_dir: when given, predictions are written there in the benchmarks' formats.
        mask_video_mode: "propagate" (default): video mask samples are segmented on their first frame and
            tracked through SAM2's video memory; "per_frame": every frame is prompted by the task embedding
            alone (for a SAM2 whose memory was never trained, e.g. the randomly initialised tiny SAM2 of
            the embedded default, whose training reaches the image path only).
    """

    def __init__(self, processor, samples, batch_size: int = 16, max_new_tokens: int = 8, media_loader=load_media,
                 output_dir: str | None = None, mask_video_mode: str = "propagate"):
        if mask_video_mode not in ("propagate", "per_frame"):
            raise ValueError(f"Unknown mask_video_mode {mask_video_mode!r}; use 'propagate' or 'per_frame'.")
        self.mask_video_mode = mask_video_mode
        self.processor = processor
        self.samples = [probe_media(dict(s)) for s in samples]
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.media_loader = media_loader
        self.output_dir = output_dir
        self.skipped = 0

    def __call__(self, model) -> dict[str, float]:
        predictions = self.predict(model)
        metrics = compute_task_metrics(predictions)
        if self.output_dir:
            write_predictions(predictions, self.output_dir)
        return metrics

    @torch.no_grad()
    def predict(self, model) -> Predictions:
        was_training = model.training
        model.eval()
        predictions = Predictions()
        try:
            grounding = [s for s in self.samples if s["task"] != "text"]
            text = [s for s in self.samples if s["task"] == "text"]
            for batch in _batches(grounding, self.batch_size):
                self._grounding_batch(model, batch, predictions)
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
        outputs = model(**self._to_device(batch, model))
        router = outputs.router_logits.argmax(-1).tolist()
        for sample, choice in zip(kept, router):
            predictions.router.append((choice, TASK_LABELS[sample["task"]]))
        if outputs.pred_boxes is not None:
            sizes = [tuple(kept[b]["image_size"]) for b in outputs.pred_boxes_batch_index.tolist()]
            boxes = self.processor.post_process_boxes(outputs.pred_boxes, sizes)
            for b, box in zip(outputs.pred_boxes_batch_index.tolist(), boxes):
                sample = kept[b]
                predictions.region.append({"id": sample["id"], "pred_box": box, "gt_box": sample["boxes_xyxy_pixels"][0],
                                           "meta": sample["meta"]})
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
            predictions.temporal.append({
                "id": sample["id"], "qid": json.loads(sample["meta"]).get("qid", sample["id"]), "windows": seconds,
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
                     "gt": gt, "frames": plan_targets.get("mask_frames", [])}
            if boxes is not None:
                entry["pred_boxes"] = boxes
            predictions.mask.append(entry)

    def _text_batch(self, model, samples: list[dict], predictions: Predictions) -> None:
        batch, kept, _ = self._encode(samples, "generate", "left")
        if batch is None:
            return
        batch.pop("tpo_meta")
        for key in ("labels", "task_labels"):
            batch.pop(key, None)
        inputs = self._to_device(batch, model)
        router = model(**inputs).router_logits.argmax(-1).tolist()
        generated = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   return_dict_in_generate=False)
        answers = self.processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                        skip_special_tokens=True)
        for sample, choice, answer in zip(kept, router, answers):
            predictions.router.append((choice, TASK_LABELS["text"]))
            reference = next((t["content"] for t in reversed(sample["conversations"]) if t["role"] == "assistant"), "")
            predictions.text.append({"id": sample["id"], "prediction": answer.strip(), "reference": reference,
                                     "options": list(sample["options"]), "answer": sample["answer"]})


def compute_task_metrics(predictions: Predictions) -> dict[str, float]:
    """The metrics of every task present (keys `task/metric`, percentages as fractions in [0, 1])."""
    metrics: dict[str, float] = {}
    if predictions.router:
        chosen, expected = np.array(predictions.router).T
        metrics["router/accuracy"] = float(np.mean(chosen == expected))
    if predictions.region:
        region = refcoco_accuracy([p["pred_box"] for p in predictions.region], [p["gt_box"] for p in predictions.region])
        metrics["region/acc@0.5"] = region["Acc@0.5"] / 100
        metrics["region/miou"] = region["mIoU"] / 100
    if predictions.temporal:
        metrics.update(_temporal_metrics(predictions.temporal))
    if predictions.mask:
        images = [p for p in predictions.mask if p["gt"]]
        flat_pred = [m for p in images for m in p["pred"][: len(p["gt"])]]
        flat_gt = [m for p in images for m in p["gt"]]
        if flat_gt:
            masks = mask_iou_metrics(flat_pred, flat_gt)
            metrics["mask/miou"] = masks["gIoU"] / 100
            metrics["mask/ciou"] = masks["cIoU"] / 100
        videos = [p for p in images if p["video"]]
        if videos:
            metrics["mask/j&f"] = j_and_f([p["pred"] for p in videos], [p["gt"] for p in videos])["J&F"] / 100
    if predictions.text:
        mcq = [p for p in predictions.text if p["options"]]
        if mcq:
            metrics["mcqa/accuracy"] = mcqa_accuracy([p["prediction"] for p in mcq], [p["answer"] for p in mcq],
                                                     [p["options"] for p in mcq])["accuracy"] / 100
        open_ended = [p for p in predictions.text if not p["options"]]
        if open_ended:
            metrics["text/exact_match"] = float(np.mean([
                p["prediction"].lower().strip(" .") == p["reference"].lower().strip(" .") for p in open_ended]))
    return metrics


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
    if any(p["saliency_scores"] for p in temporal):
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


def format_table(metrics: dict[str, float]) -> str:
    """A two-column table of the metrics, required keys first."""
    keys = [k for k in REQUIRED_KEYS if k in metrics] + sorted(k for k in metrics if k not in REQUIRED_KEYS)
    width = max(len(k) for k in keys) if keys else 10
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {metrics[k]:.4f}" for k in keys]
    return "\n".join(lines)


def group_by_task(samples) -> dict[str, list]:
    groups = defaultdict(list)
    for sample in samples:
        groups[sample["task"]].append(sample)
    return dict(groups)
