"""`TPOPipeline`: one call from media and a question to the answer, with the time spans, boxes or masks of the task
the model used, in the original media's units.

    pipe = pipeline(model="path/to/tpo-checkpoint", trust_remote_code=True, device="cpu", dtype="float32")
    pipe("video.mp4", "When does the red circle appear?")
    # {"text": "...", "task": "temporal", "spans": [{"start": 2.0, "end": 5.5, "score": 0.9}, ...],
    #  "saliency": [{"time": 0.5, "score": 0.1}, ...]}
    pipe([("a.png", "Where is the dog?"), (frames, "Segment the car.")], batch_size=2, force_task=["region", "mask"])

Media: a path to an image or a video file, a PIL image, an (h, w, 3) uint8 array, or a list of frames (PIL images
or arrays, `fps` frames a second, default 1), or None for text only. A list of (media, question) pairs (or dicts
with "media" and "question") is answered in batches of `batch_size` and gives a list.

Output: `text` (the answer, task tokens left out) and `task` ("text", "temporal", "region" or "mask": the task
the answer used, or `force_task`), plus for the task used:
- temporal: `spans` [{"start", "end", "score"}] seconds of the video, best first, and `saliency`
  [{"time", "score"}] per frame the model saw;
- region: `boxes` [[x0, y0, x1, y1], ...] pixels of the original image, one per box query;
- mask: `masks` COCO RLE ({"size": [h, w], "counts"}) at the original size, one per frame (one for an image),
  `mask_boxes` [[x0, y0, x1, y1]] pixels per frame, and for videos `mask_times` (seconds of those frames: the
  frames the MLLM saw, tracked through SAM2's memory by default, `mask_video_mode`).
An answer with several queries of one task gives the first query's spans / masks (and every query's boxes).

`force_task`: a task name for every input, or one per input (None: the model decides), as
`TPOForConditionalGeneration.generate`. Device and dtype come from `pipeline(...)` (`device=`, `dtype=`).

Remote code: copied next to checkpoints with the processor (`TPOProcessor.pipeline` imports it) and named by the
model config's `custom_pipelines`, so `pipeline(model=folder, trust_remote_code=True)` needs only torch,
transformers, numpy and PIL; PyAV when a video file is read, pycocotools when masks are encoded as RLE.
"""

import logging
import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

logger = logging.getLogger(__name__)

PIPELINE_TASK = "tpo"  # the key of `custom_pipelines` in a TPO checkpoint's config.json
TASKS_IN_OUTPUT_ORDER = ("temporal", "region", "mask")


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _frame_array(frame, where: str) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return _rgb(frame)
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{where}: a frame must be a PIL image or an (h, w, 3) uint8 array, got {array.dtype} "
                         f"{tuple(array.shape)}.")
    return array


def _open_file(path: str, where: str) -> tuple[str, object]:
    """("image", array) or ("video", metadata) of a media file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such media file {path!r}.")
    try:
        with Image.open(path) as image:
            return "image", _rgb(image)
    except (OSError, ValueError):
        pass  # not an image: a video, or nothing readable
    from .video import probe_video

    try:
        return "video", probe_video(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: {path!r} is neither an image nor a video PyAV can read ({error}).") from error


class TPOPipeline(Pipeline):
    """Answer questions about images and videos with a TPO model (see the module docstring)."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False  # TPO decodes and resizes video itself (transformers' needs torchvision)
    _load_feature_extractor = False

    def _sanitize_parameters(self, fps=None, max_new_tokens=None, mask_video_mode=None, mask_threshold=None, **kwargs):
        if kwargs:
            raise TypeError(f"TPOPipeline got unknown argument(s) {sorted(kwargs)}; it takes fps, max_new_tokens, "
                            "mask_video_mode, mask_threshold, force_task and batch_size.")
        preprocess = {"fps": fps} if fps is not None else {}
        forward = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("mask_video_mode", mask_video_mode))
                   if v is not None}
        postprocess = {"mask_threshold": mask_threshold} if mask_threshold is not None else {}
        return preprocess, forward, postprocess

    def __call__(self, inputs, question: str | None = None, force_task=None, batch_size: int | None = None, **kwargs):
        """`pipe(media, question)` -> a dict; `pipe([(media, question), ...])` -> a list of dicts (see the module
        docstring)."""
        single = question is not None
        items = [(inputs, question)] if single else self._pairs(inputs)
        forced = list(force_task) if isinstance(force_task, (list, tuple)) else [force_task] * len(items)
        if len(forced) != len(items):
            raise ValueError(f"force_task names {len(forced)} task(s) for {len(items)} input(s); give one task, or one "
                             "per input (None: the model decides).")
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        preprocess, forward = {**self._preprocess_params, **preprocess}, {**self._forward_params, **forward}
        postprocess = {**self._postprocess_params, **postprocess}
        size = int(batch_size or self._batch_size or 1)
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}.")
        entries = [{"index": i, "media": m, "question": q, "force_task": f}
                   for i, ((m, q), f) in enumerate(zip(items, forced))]
        results = []
        for start in range(0, len(entries), size):
            results += self.run_single(entries[start : start + size], preprocess, forward, postprocess)
        return results[0] if single else results

    @staticmethod
    def _pairs(inputs) -> list:
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError("Call the pipeline as pipe(media, question), or with a non-empty list of (media, question) "
                             "pairs or {'media', 'question'} dicts.")
        pairs = []
        for i, item in enumerate(inputs):
            if isinstance(item, dict) and "question" in item:
                pairs.append((item.get("media"), item["question"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str):
                pairs.append((item[0], item[1]))
            else:
                raise ValueError(f"Input {i}: expected a (media, question) pair or a {{'media', 'question'}} dict, got "
                                 f"{type(item).__name__}; for one video given as frames call pipe(frames, question).")
        return pairs

    # ---- preprocessing ----------------------------------------------------------------------------------
    def _media(self, entry: dict, fps: float) -> tuple[dict, dict]:
        """(sample fields of the common schema, decoded media of the collator) of one input."""
        where, media = f"Input {entry['index']}", entry["media"]
        if media is None:
            return {"media_type": "none"}, {}
        if isinstance(media, (str, os.PathLike)):
            kind, content = _open_file(str(media), where)
            if kind == "image":
                return {"media_type": "image", "media_path": str(media), "image_size": list(content.shape[:2])}, \
                    {"image": content}
            return {"media_type": "video", "media_path": str(media), "image_size": [content.height, content.width],
                    "duration_seconds": float(content.duration_seconds)}, {"path": str(media)}
        if isinstance(media, Image.Image) or (isinstance(media, np.ndarray) and media.ndim == 3):
            image = _frame_array(media, where)
            return {"media_type": "image", "image_size": list(image.shape[:2])}, {"image": image}
        if isinstance(media, (list, tuple)) or (isinstance(media, np.ndarray) and media.ndim == 4):
            frames = [_frame_array(f, f"{where} frame {j}") for j, f in enumerate(media)]
            if not frames or len({f.shape for f in frames}) != 1:
                raise ValueError(f"{where}: a video given as frames needs at least one frame, all of one size.")
            if not fps > 0:
                raise ValueError(f"fps must be > 0 for videos given as frames, got {fps}.")
            return {"media_type": "frames", "fps": float(fps), "image_size": list(frames[0].shape[:2]),
                    "duration_seconds": len(frames) / float(fps)}, {"all_frames": np.stack(frames)}
        raise ValueError(f"{where}: media of type {type(media).__name__} is not understood; give a file path, a PIL "
                         "image, an (h, w, 3) uint8 array, a list of frames, or None.")

    @staticmethod
    def _decode(plan: dict, decoded: dict, fps: float) -> dict:
        """The frames the processor's plan asks for, with their times."""
        if plan.get("kind") != "video":
            return decoded
        if "path" in decoded:
            from .video import load_video

            clip = load_video(decoded["path"], timestamps_seconds=plan["timestamps"])
            return {"frames": clip.frames, "timestamps": list(clip.metadata.timestamps_seconds)}
        frames = decoded["all_frames"]
        # frame i is on screen during [i / fps, (i + 1) / fps), as tpo.processing.pipeline.load_media reads folders
        indices = [min(max(int(round(t * fps - 0.5)), 0), len(frames) - 1) for t in plan["timestamps"]]
        return {"frames": frames[indices], "timestamps": [(i + 0.5) / fps for i in indices]}

    def preprocess(self, entries: list[dict], fps: float = 1.0) -> dict:
        from .collator_tpo import _nearest_head_frames, collate_encoded

        processor, encoded, media, items = self.processor, [], [], []
        sam2_images, sam2_sample, sam2_frame, sam2_view = [], [], [], []
        has_masks = "mask" in self.model.config.tasks
        for b, entry in enumerate(entries):
            question = entry["question"]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"Input {entry['index']}: the question must be a non-empty string, got {question!r}.")
            fields, decoded = self._media(entry, fps)
            sample = {"id": f"input-{entry['index']}", "task": "text", "query": question, "frame_paths": [],
                      "media_path": "",
                      "conversations": [{"role": "user", "content": question}], **fields}
            item = processor.encode(sample, mode="generate")
            decoded = self._decode(item.media, decoded, fps)
            encoded.append(item)
            media.append(decoded)
            height, width = fields.get("image_size") or (0, 0)
            items.append({"index": entry["index"], "force_task": entry["force_task"], "size": (height, width),
                          "kind": item.media.get("kind"), "duration": float(item.media.get("duration", 0.0)),
                          "timestamps": decoded.get("timestamps", [])})
            # every input with media gets its SAM2 images (cheap: a resize), whatever it is asked: the answer may ask
            # for a mask after a forced task; SAM2's encoder runs only for the mask queries
            if has_masks and item.media.get("kind") in ("image", "video"):
                images = [decoded["image"]] if "image" in decoded else list(decoded["frames"])
                sam2_images += images
                sam2_sample += [b] * len(images)
                sam2_frame += ([-1] if "image" in decoded else
                               _nearest_head_frames(processor, {**decoded, "sam2_timestamps": decoded["timestamps"]},
                                                    len(images)))
                sam2_view += [processor.view_to_sam2(height, width)] * len(images)
        batch = collate_encoded(processor, encoded, media, padding_side="left")
        for key in ("labels", "task_labels", "tpo_meta"):
            batch.pop(key, None)
        if sam2_images:
            batch["sam2_pixel_values"] = processor.sam2_inputs(sam2_images)["sam2_pixel_values"]
            batch["sam2_batch_index"] = torch.tensor(sam2_sample)
            batch["mask_frame_index"] = torch.tensor(sam2_frame)
            batch["mask_view_to_sam2"] = torch.tensor(sam2_view, dtype=torch.float32)
        return {"inputs": batch, "items": items}

    # ---- model ------------------------------------------------------------------------------------------
    def _forward(self, model_inputs: dict, max_new_tokens: int = 32, mask_video_mode: str = "propagate") -> dict:
        inputs, items = model_inputs["inputs"], model_inputs["items"]
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(dtype) if v.is_floating_point() and "pixel_values" in k else v for k, v in inputs.items()}
        forced = [item["force_task"] for item in items]
        out = self.model.generate(**inputs, force_task=forced if any(forced) else None, max_new_tokens=max_new_tokens,
                                  do_sample=False, mask_video_mode=mask_video_mode)
        return {"new_tokens": out.sequences[:, inputs["input_ids"].shape[1]:], "task_outputs": out.task_outputs,
                "items": items}

    # ---- outputs ----------------------------------------------------------------------------------------
    def postprocess(self, model_outputs: dict, mask_threshold: float = 0.0) -> list[dict]:
        texts = self.processor.tokenizer.batch_decode(model_outputs["new_tokens"], skip_special_tokens=True)
        results = []
        for text, item, outputs in zip(texts, model_outputs["items"], model_outputs["task_outputs"]):
            outputs = outputs or {}
            task = item["force_task"] or next((t for t in TASKS_IN_OUTPUT_ORDER if t in outputs), "text")
            result = {"text": text.strip(), "task": task}
            for name in TASKS_IN_OUTPUT_ORDER:
                if name in outputs:
                    result.update(getattr(self, f"_{name}_output")(outputs[name], item, mask_threshold))
            extra = {n: len(outputs[n][k]) - 1 for n, k in (("temporal", "windows"), ("mask", "mask_logits"))
                     if n in outputs and len(outputs[n][k]) > 1}
            if extra:
                logger.warning("Input %d: the answer holds more than one query of %s; the first one's output is "
                               "given, %s more left out.", item["index"], sorted(extra), extra)
            results.append(result)
        return results

    def _temporal_output(self, temporal: dict, item: dict, threshold: float) -> dict:
        duration = item["duration"]
        windows = self.processor.post_process_spans([temporal["windows"][0]], [duration])[0]
        times = (temporal["frame_times"][0].float() * duration).tolist()
        return {"spans": [{"start": float(s), "end": float(e), "score": float(p)} for s, e, p in windows],
                "saliency": [{"time": t, "score": float(v)} for t, v in zip(times, temporal["saliency"][0].tolist())]}

    def _region_output(self, region: dict, item: dict, threshold: float) -> dict:
        boxes = region["boxes"]
        return {"boxes": self.processor.post_process_boxes(boxes, [item["size"]] * len(boxes))}

    def _mask_output(self, mask: dict, item: dict, threshold: float) -> dict:
        logits = mask["mask_logits"][0]  # (frames, h, w) of the first mask query
        sizes = [item["size"]] * logits.shape[0]
        masks = self.processor.post_process_masks(logits, sizes, threshold=threshold, return_rle=True)
        out = {"masks": [m["rle"] for m in masks],
               "mask_boxes": self.processor.post_process_mask_boxes(mask["boxes"][0], sizes)}
        if item["kind"] == "video":
            out["mask_times"] = [float(t) for t in item["timestamps"]]
        return out


if PIPELINE_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=TPOPipeline, pt_model=AutoModel, type="multimodal")
