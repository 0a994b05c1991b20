"""The common sample schema every reader produces, as `datasets.Features`.

One row per sample (a query, or a conversation). Units are in the names: spans in seconds, boxes in
pixels of the original image as (x0, y0, x1, y1), masks as COCO RLE with string `counts`.
"""

import copy
import json
import math

from datasets import Features, List, Value

from .rle import check_rle, mask_from_rle, rle_from_mask, rle_from_polygons  # noqa: F401 (the schema's mask helpers)

MEDIA_TYPES = ("image", "video", "frames", "none")

SAMPLE_FEATURES = Features({
    "id": Value("string"),
    "source": Value("string"),
    "split": Value("string"),
    "task": Value("string"),
    "media_type": Value("string"),
    "media_path": Value("string"),
    "frame_paths": List(Value("string")),
    "query": Value("string"),
    "conversations": List({"role": Value("string"), "content": Value("string")}),
    "options": List(Value("string")),
    "answer": Value("string"),
    "duration_seconds": Value("float32"),
    "fps": Value("float32"),
    "clip_seconds": List(Value("float32")),  # [start, end] of the video the sample is about; [] for all of it
    "spans_seconds": List(List(Value("float32"), length=2)),
    "saliency_clip_seconds": Value("float32"),
    "saliency_clip_ids": List(Value("int32")),
    "saliency_scores": List(List(Value("int32"), length=3)),
    "image_size": List(Value("int32"), length=2),
    "boxes_xyxy_pixels": List(List(Value("float32"), length=4)),
    "masks_rle": List({"size": List(Value("int32"), length=2), "counts": Value("string")}),
    "mask_frame_indices": List(Value("int32")),
    "meta": Value("string"),
})

_EMPTY = {
    "id": "", "source": "", "split": "", "task": "text", "media_type": "none", "media_path": "", "frame_paths": [],
    "query": "", "conversations": [], "options": [], "answer": "", "duration_seconds": 0.0, "fps": 0.0,
    "clip_seconds": [],
    "spans_seconds": [], "saliency_clip_seconds": 0.0, "saliency_clip_ids": [], "saliency_scores": [],
    "image_size": [0, 0], "boxes_xyxy_pixels": [], "masks_rle": [], "mask_frame_indices": [], "meta": "{}",
}


def valid_span(start: float, end: float, duration: float | None = None) -> bool:
    """The rule for a span or clip in seconds: 0 <= start < end, and end <= duration (+ 1 ms) when a duration
    is given (False for NaN). The processor applies the same rule in its own remote-code copy."""
    if duration:
        return 0 <= start < end <= duration + 1e-3
    return 0 <= start < end


def empty_sample(**fields) -> dict:
    """A row with every schema field at its empty value, updated with `fields`."""
    unknown = set(fields) - set(_EMPTY)
    if unknown:
        raise ValueError(f"Unknown sample field(s) {sorted(unknown)}; the schema has {sorted(_EMPTY)}.")
    sample = copy.deepcopy(_EMPTY)
    sample.update(fields)
    if isinstance(sample["meta"], dict):
        sample["meta"] = json.dumps(sample["meta"], sort_keys=True)
    return sample


def check_sample_values(sample: dict) -> None:
    """Raise ValueError naming the sample for a non-finite duration, span or box, or an RLE whose runs do
    not cover its size (what no later check catches: NaN passes every bound test)."""
    sample_id = sample.get("id", "?")
    duration = sample.get("duration_seconds")
    if duration is not None and not math.isfinite(duration):
        raise ValueError(f"Sample {sample_id!r}: duration {duration} s is not a finite number of seconds.")
    for span in sample.get("spans_seconds") or []:
        if not all(math.isfinite(v) for v in span):
            raise ValueError(f"Sample {sample_id!r}: span {list(span)} s is not finite; give (start, end) in seconds.")
    for box in sample.get("boxes_xyxy_pixels") or []:
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"Sample {sample_id!r}: box {list(box)} is not finite; give (x0, y0, x1, y1) pixels.")
    for index, rle in enumerate(sample.get("masks_rle") or []):
        check_rle(rle, f"Sample {sample_id!r} mask {index}")


def validate_sample(sample: dict) -> None:
    """Raise ValueError naming the sample when a row breaks the schema's rules."""
    # the task list is the model configuration's, imported here: the model package imports torch, the schema does not
    from ..modeling_tpo.configuration_tpo import ROUTER_CLASSES

    check_sample_values(sample)
    sample_id = sample.get("id", "?")
    if sample["task"] not in ROUTER_CLASSES:
        raise ValueError(f"Sample {sample_id!r}: unknown task {sample['task']!r}; valid tasks are {list(ROUTER_CLASSES)}.")
    if sample["media_type"] not in MEDIA_TYPES:
        raise ValueError(f"Sample {sample_id!r}: unknown media_type {sample['media_type']!r}; valid: {list(MEDIA_TYPES)}.")
    for start, end in sample["spans_seconds"]:
        if not start < end:
            raise ValueError(f"Sample {sample_id!r}: span ({start}, {end}) s needs start < end.")
        if sample["duration_seconds"] and not valid_span(start, end, sample["duration_seconds"]):
            raise ValueError(f"Sample {sample_id!r}: span ({start}, {end}) s lies outside [0, {sample['duration_seconds']}] s.")
    clip = list(sample.get("clip_seconds") or [])
    if clip and not (len(clip) == 2 and valid_span(*clip)):
        raise ValueError(f"Sample {sample_id!r}: clip_seconds {clip} must be [start, end] with 0 <= start < end.")
    height, width = sample["image_size"]
    for box in sample["boxes_xyxy_pixels"]:
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"Sample {sample_id!r}: box {box} needs x0 < x1 and y0 < y1.")
        if height and width and (x0 < 0 or y0 < 0 or x1 > width + 1e-3 or y1 > height + 1e-3):
            raise ValueError(f"Sample {sample_id!r}: box {box} lies outside the {width}x{height} image.")
    for rle in sample["masks_rle"]:
        if height and width and [int(v) for v in rle["size"]] != [height, width]:
            raise ValueError(f"Sample {sample_id!r}: a mask of size {list(rle['size'])} does not match the image "
                             f"size ({height}, {width}).")
