"""From datasets of the common schema to model batches (README.md, "Data", "Where the work happens").

`encode_dataset` (a batched `Dataset.map`) does the token side and caches token ids and small targets,
never pixels; `data_collator.TPODataCollator` decodes media in the DataLoader workers, one batch at a time.

Bad data: `encode_dataset` drops samples the processor refuses (invalid or non-finite spans and boxes,
wrong mask size, corrupt RLE, an image over PIL's pixel limit, ...)
with a logged warning naming the sample and the reason, and logs the count (`strict=True` raises
instead). The collator replaces a sample whose media cannot be decoded (missing or corrupt file, a video
shorter than its annotation's duration, an image over PIL's pixel limit) by the
previous good sample of the run, logs a warning naming the file, and counts it in
`batch["tpo_meta"]["skipped"]` (the trainer logs the total as `data/skipped_samples`).
"""

import hashlib
import json
import logging

import numpy as np
from datasets import Dataset

from .images import ImageFileError, image_size, read_image_rgb
from .processing_tpo import TPOProcessor
from .schema import check_sample_values

logger = logging.getLogger(__name__)

ENCODED_COLUMNS = (
    "sample_id", "input_ids", "labels", "task_label", "instruction_end_index", "query_token_mask",
    "frame_token_index", "mm_token_type_ids", "visual_token_xy", "media_plan", "targets", "length",
)


class MediaError(ValueError):
    """Media of a sample cannot be read (missing, corrupt, truncated, no video stream, or shorter than its
    annotation says)."""


# An annotation may say a video lasts longer than the file does by at most this much (container
# rounding, a last frame's duration); past it the annotation is for another cut of the video: every
# frame sampled beyond the file's end would be its last frame and the targets would be wrong.
DURATION_EXCESS_SECONDS = 1.0
DURATION_EXCESS_FRACTION = 0.02


# --------------------------------------------------------------------------------------------------
# Media probing and decoding
# --------------------------------------------------------------------------------------------------
def probe_media(sample: dict) -> dict:
    """Fill `image_size` (and `duration_seconds` for videos) when a sample lacks them."""
    kind = sample.get("media_type", "none")
    size = list(sample.get("image_size") or [0, 0])
    if kind == "image" and not all(size):
        sample = {**sample, "image_size": list(image_size(sample["media_path"]))}
    elif kind == "frames" and not all(size):
        sample = {**sample, "image_size": list(image_size(sample["frame_paths"][0]))}
    elif kind == "video" and (not all(size) or not sample.get("duration_seconds")):
        from .video import probe_video

        info = probe_video(sample["media_path"])
        sample = {**sample, "image_size": [info.height, info.width],
                  "duration_seconds": sample.get("duration_seconds") or info.duration_seconds}
    return sample


def _read_image(path: str) -> np.ndarray:
    try:
        return read_image_rgb(path)
    except ImageFileError as error:
        raise MediaError(f"Cannot read image: {error}") from error


def check_video_duration(plan: dict, decoded_seconds: float) -> None:
    """Refuse a video shorter than its annotation's duration (by more than the tolerance above)."""
    declared = float(plan.get("duration") or 0.0)
    allowed = decoded_seconds + max(DURATION_EXCESS_SECONDS, DURATION_EXCESS_FRACTION * decoded_seconds)
    if decoded_seconds > 0 and declared > allowed:
        raise MediaError(f"Video {plan.get('path')!r} lasts {decoded_seconds:.2f} s but its annotation says "
                         f"{declared:.2f} s: frames past {decoded_seconds:.2f} s would all be its last frame and the "
                         "targets would not match; fix the annotation's duration or the video file.")


def load_media(plan: dict, targets: dict | None = None) -> dict:
    """Decode what a sample's media plan asks for.

    Returns {} (no media), {"image": (h, w, 3)}, or {"frames": (T, h, w, 3), "timestamps": [T]} plus
    {"sam2_frames": (m, h, w, 3), "sam2_timestamps": [m seconds]} when a video mask sample names its
    annotated frames, and {"dense_frames": (K, h, w, 3), "dense_frame_timestamps": [K seconds]} when the plan
    has dense clips (`dense_timestamps`, decoded in the same pass as the MLLM's frames). Raises ValueError (not
    a skip: the setting is wrong for this video) when the video has fewer frames than dense clips.
    """
    kind = plan.get("kind")
    if kind == "image":
        return {"image": _read_image(plan["path"])}
    if kind != "video":
        return {}
    targets = targets or {}
    dense = list(plan.get("dense_timestamps") or [])
    times = list(plan["timestamps"]) + dense
    if plan.get("source") == "frames":
        paths, fps = plan["frame_paths"], plan["fps"] or 1.0
        _check_dense_clips(plan, len(dense), len(paths))
        indices = [min(int(round(t * fps - 0.5)), len(paths) - 1) for t in times]
        indices = [max(i, 0) for i in indices]
        decoded = {i: _read_image(paths[i]) for i in set(indices)}
        frames = np.stack([decoded[i] for i in indices])
        media = _split_dense({"frames": frames, "timestamps": [(i + 0.5) / fps for i in indices]}, len(dense))
        if targets.get("mask_frames"):
            media["sam2_frames"] = np.stack([_read_image(paths[i]) for i in targets["mask_frames"]])
            media["sam2_timestamps"] = [(i + 0.5) / fps for i in targets["mask_frames"]]
        return media
    from .video import VideoLoadError, load_video

    try:
        video = load_video(plan["path"], timestamps_seconds=times)
        check_video_duration(plan, video.metadata.duration_seconds)
        if dense:
            metadata = video.metadata
            _check_dense_clips(plan, len(dense), metadata.num_frames or round(metadata.fps * metadata.duration_seconds))
        media = _split_dense({"frames": video.frames, "timestamps": list(video.metadata.timestamps_seconds)}, len(dense))
        if targets.get("mask_frames"):
            fps = video.metadata.fps
            extra = load_video(plan["path"], timestamps_seconds=[i / fps for i in targets["mask_frames"]])
            media["sam2_frames"] = extra.frames
            media["sam2_timestamps"] = list(extra.metadata.timestamps_seconds)
    except VideoLoadError as error:
        raise MediaError(str(error)) from error
    return media


def _split_dense(media: dict, count: int) -> dict:
    """Move the last `count` decoded frames (the dense clips) to `dense_frames` / `dense_frame_timestamps`."""
    if not count:
        return media
    frames, times = media["frames"], media["timestamps"]
    return {"frames": frames[:-count], "timestamps": times[:-count], "dense_frames": frames[-count:],
            "dense_frame_timestamps": times[-count:]}


def _check_dense_clips(plan: dict, clips: int, frames: int) -> None:
    if clips and frames and clips > frames:
        from .processing_tpo import dense_clips_error

        raise ValueError(dense_clips_error(plan.get("path"), clips, frames, plan["dense_clip_seconds"], plan["duration"]))


# --------------------------------------------------------------------------------------------------
# Token side: Dataset.map
# --------------------------------------------------------------------------------------------------
def _encode_batch(batch: dict, processor: TPOProcessor, mode: str, strict: bool) -> dict:
    out = {name: [] for name in ENCODED_COLUMNS}
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    for row in rows:
        try:
            check_sample_values(row)
            encoded = processor.encode(probe_media(row), mode=mode)
        except (ValueError, OSError) as error:
            if strict:
                raise
            logger.warning("Dropping sample %r: %s", row.get("id"), error)
            continue
        out["sample_id"].append(str(row.get("id", "")))
        out["input_ids"].append(encoded.input_ids)
        out["labels"].append(encoded.labels)
        out["task_label"].append(encoded.task_label)
        out["instruction_end_index"].append(encoded.instruction_end_index)
        out["query_token_mask"].append(encoded.query_token_mask)
        out["frame_token_index"].append(encoded.frame_token_index)
        out["mm_token_type_ids"].append(encoded.mm_token_type_ids)
        out["visual_token_xy"].append(encoded.visual_token_xy)
        out["media_plan"].append(json.dumps(encoded.media))
        out["targets"].append(json.dumps(encoded.targets))
        out["length"].append(len(encoded.input_ids))  # for `train_sampling_strategy="group_by_length"`
    return out


def _processor_fingerprint(processor: TPOProcessor) -> str:
    digest = hashlib.sha256()
    digest.update(processor.to_json_string().encode())
    digest.update(json.dumps(sorted(processor.tokenizer.get_vocab().items())).encode())
    digest.update(str(processor.chat_template or processor.tokenizer.chat_template).encode())
    return digest.hexdigest()[:16]


def encode_dataset(dataset: Dataset, processor: TPOProcessor, mode: str = "train", num_proc: int | None = None,
                   strict: bool = False, batch_size: int = 64, load_from_cache_file: bool = True) -> Dataset:
    """Token-side preprocessing with `Dataset.map` (batched, `num_proc`-capable).

    Rows hold the columns of `ENCODED_COLUMNS`; `length` (tokens) lets the Trainer batch samples of similar
    length (`train_sampling_strategy="group_by_length"`), which saves most of the padding of batches that mix
    videos (hundreds of visual tokens) and images (tens).

    The cache fingerprint is derived from the input dataset's fingerprint, the processor's settings,
    its vocabulary and chat template, and `mode`, so it is stable across runs and processes and
    changes exactly when one of them does.
    """
    fingerprint = hashlib.sha256(
        f"{dataset._fingerprint}-{_processor_fingerprint(processor)}-{mode}-{strict}-v3".encode()
    ).hexdigest()[:16]
    before = len(dataset)
    encoded = dataset.map(
        _encode_batch,
        fn_kwargs={"processor": processor, "mode": mode, "strict": strict},
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        new_fingerprint=fingerprint,
        load_from_cache_file=load_from_cache_file,
        desc=f"TPO encode ({mode})",
    )
    dropped = before - len(encoded)
    if dropped:
        logger.warning("encode_dataset dropped %d of %d samples (see the warnings above for which and why).",
                       dropped, before)
    return encoded


def evenly_spaced_mask_frames(sample: dict, count: int) -> dict:
    """A video mask sample (schema row) with `count` of its annotated frames, evenly spaced (the first and the
    last kept); unchanged with fewer frames, `count` 0, or an image. For evaluating on part of the frames."""
    masks, frames = list(sample.get("masks_rle") or []), list(sample.get("mask_frame_indices") or [])
    if count <= 0 or len(masks) <= count or sample.get("media_type") == "image" or len(frames) != len(masks):
        return sample
    chosen = sorted(set(np.linspace(0, len(masks) - 1, num=count).round().astype(int).tolist()))
    return {**sample, "masks_rle": [masks[i] for i in chosen], "mask_frame_indices": [frames[i] for i in chosen]}
