"""Batching of encoded samples and their decoded media into model inputs (no file I/O).

Copied next to checkpoints with the processor (remote code): numpy and torch only.
"""

import numpy as np
import torch

from .processing_tpo import IGNORE_INDEX


def _pad(rows: list[list], value, padding_side: str) -> tuple[torch.Tensor, list[int]]:
    """Pad lists to one length; returns the tensor and each row's left offset."""
    length = max(len(r) for r in rows)
    out, offsets = [], []
    for row in rows:
        pad = [value] * (length - len(row))
        out.append(pad + list(row) if padding_side == "left" else list(row) + pad)
        offsets.append(len(pad) if padding_side == "left" else 0)
    return torch.tensor(out), offsets


def collate_encoded(processor, encoded: list, media: list[dict], padding_side: str = "right") -> dict:
    """Pad and stack `EncodedSample`s with their decoded media.

    media[i]: {} (text only), {"image": (h, w, 3) uint8}, or {"frames": (T, h, w, 3) uint8,
    "timestamps": [T seconds]}, plus {"sam2_frames": (m, h, w, 3)} for video mask samples and
    {"dense_frames": (K, h, w, 3)} for temporal samples whose plan has dense clips (`dense_timestamps`).

    Returns the model's keyword arguments (see `TPOForConditionalGeneration.forward`), with
    `tpo_meta` holding per-sample metadata for evaluation (ignored by the model):
        input_ids, attention_mask, labels (batch, seq); task_labels, instruction_end_index (batch,);
        query_token_mask, frame_token_index (batch, seq); visual_token_xy (batch, seq, 2) patch centres
        in [0, 1] (-1 for other tokens); frame_timestamps (batch, frames) seconds,
        -1 where padded; video_durations (batch,) seconds (0 without video);
        region_boxes (n, 4) + region_batch_index (n,);
        temporal_spans (s, 2) normalised + temporal_span_query_index (s,), temporal_saliency (q, frames);
        sam2_pixel_values (m, 3, S, S), mask_targets (m, S, S), mask_query_index (m,);
        pixel tensors of the MLLM (pixel_values, image_grid_thw, pixel_values_videos, ...);
        with dense clips: dense_clip_timestamps (batch, clips) seconds, -1 where padded (and for samples without
        clips), and the vision inputs of all clips, sample by sample (dense_pixel_values, dense_image_grid_thw, ...).
    `tpo_meta["head_frame_timestamps"]` holds the temporal head's frame times per sample: the dense clips' centres
    for samples with clips, else the MLLM's head frames.
    """
    if len(encoded) != len(media):
        raise ValueError(f"{len(encoded)} encoded samples but {len(media)} media entries.")
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before batching.")
    input_ids, offsets = _pad([e.input_ids for e in encoded], pad_id, padding_side)
    attention_mask, _ = _pad([[1] * len(e.input_ids) for e in encoded], 0, padding_side)
    labels, _ = _pad([e.labels for e in encoded], IGNORE_INDEX, padding_side)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_labels": torch.tensor([e.task_label for e in encoded]),
        "instruction_end_index": torch.tensor([e.instruction_end_index + o for e, o in zip(encoded, offsets)]),
        "query_token_mask": _pad([e.query_token_mask for e in encoded], 0, padding_side)[0].bool(),
        "frame_token_index": _pad([e.frame_token_index for e in encoded], -1, padding_side)[0],
        "visual_token_xy": _pad([e.visual_token_xy or [[-1.0, -1.0]] * len(e.input_ids) for e in encoded],
                                [-1.0, -1.0], padding_side)[0].float(),
    }
    if processor.uses_mm_token_type_ids:
        batch["mm_token_type_ids"] = _pad([e.mm_token_type_ids for e in encoded], 0, padding_side)[0]

    items, head_times, temporal_times, durations, dense_frames = [], [], [], [], []
    for e, m in zip(encoded, media):
        kind = e.media.get("kind")
        if kind == "image":
            items.append(("image", _require(m, "image", e)))
            head_times.append([])
        elif kind == "video":
            frames = _require(m, "frames", e)
            if len(frames) != len(e.media["timestamps"]):
                raise ValueError(f"Sample {e.media.get('path')!r}: {len(frames)} decoded frames, "
                                 f"{len(e.media['timestamps'])} planned.")
            items.append(("video", frames))
            head_times.append(processor.head_frame_timestamps(list(m.get("timestamps", e.media["timestamps"]))))
            if e.media.get("dense_timestamps"):
                clips = _require(m, "dense_frames", e)
                if len(clips) != len(e.media["dense_timestamps"]):
                    raise ValueError(f"Sample {e.media.get('path')!r}: {len(clips)} decoded dense clip frames, "
                                     f"{len(e.media['dense_timestamps'])} planned.")
                dense_frames += list(clips)
        else:
            head_times.append([])
        temporal_times.append(processor.temporal_frame_timestamps(e.media, m.get("timestamps", e.media["timestamps"]))
                              if kind == "video" else [])
        durations.append(float(e.media.get("duration", 0.0)))
    batch.update(processor.pixel_inputs(items))
    num_frames = max((len(t) for t in head_times), default=0)
    if num_frames:
        batch["frame_timestamps"] = _padded_times(head_times)
        batch["video_durations"] = torch.tensor(durations)
    if dense_frames:
        batch["dense_clip_timestamps"] = _padded_times([e.media.get("dense_timestamps") or [] for e in encoded])
        batch.update(processor.dense_pixel_inputs(dense_frames))

    _collate_targets(processor, encoded, media, batch, max((len(t) for t in temporal_times), default=0))
    batch["tpo_meta"] = {
        "media": [e.media for e in encoded],
        "head_frame_timestamps": temporal_times,
    }
    return batch


def _padded_times(rows: list[list[float]]) -> torch.Tensor:
    """(batch, max length) seconds, -1 where a row is shorter."""
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [-1.0] * (width - len(row)) for row in rows], dtype=torch.float32)


def _require(media: dict, key: str, encoded):
    if key not in media:
        raise ValueError(f"Sample with media {encoded.media.get('path')!r} needs decoded `{key}`.")
    return np.asarray(media[key])


def _collate_targets(processor, encoded, media, batch, num_frames) -> None:
    boxes, box_batch = [], []
    spans, span_query, saliency = [], [], []
    sam2_images, sam2_masks, mask_query, mask_frame, view_to_sam2 = [], [], [], [], []
    temporal_query = mask_index = 0
    for index, (e, m) in enumerate(zip(encoded, media)):
        targets = e.targets
        for box in targets.get("region_boxes", []):
            boxes.append(box)
            box_batch.append(index)
        if "temporal_spans" in targets:
            for span in targets["temporal_spans"]:
                spans.append(span)
                span_query.append(temporal_query)
            row = list(targets["temporal_saliency"])
            saliency.append(row + [0.0] * (num_frames - len(row)))
            temporal_query += 1
        if "masks_rle" in targets:
            if e.media.get("kind") == "image":
                images = [np.asarray(m["image"])]
                frame_index = [-1]
            else:
                images = list(_require(m, "sam2_frames", e))
                frame_index = _nearest_head_frames(processor, m, len(images))
            if len(images) != len(targets["masks_rle"]):
                raise ValueError(f"Sample {e.media.get('path')!r}: {len(images)} SAM2 frames for "
                                 f"{len(targets['masks_rle'])} masks.")
            sam2_images += images
            mask_frame += frame_index
            height, width = np.asarray(images[0]).shape[:2]
            view_to_sam2 += [processor.view_to_sam2(height, width)] * len(images)
            sam2_masks += list(targets["masks_rle"])
            mask_query += [mask_index] * len(images)
            mask_index += 1
    if boxes:
        batch["region_boxes"] = torch.tensor(boxes, dtype=torch.float32)
        batch["region_batch_index"] = torch.tensor(box_batch)
    if spans:
        batch["temporal_spans"] = torch.tensor(spans, dtype=torch.float32)
        batch["temporal_span_query_index"] = torch.tensor(span_query)
        batch["temporal_saliency"] = torch.tensor(saliency, dtype=torch.float32)
    if sam2_images:
        sam2 = processor.sam2_inputs(sam2_images, sam2_masks)
        batch["sam2_pixel_values"] = sam2["sam2_pixel_values"]
        batch["mask_targets"] = sam2["mask_targets"]
        batch["mask_query_index"] = torch.tensor(mask_query)
        batch["mask_frame_index"] = torch.tensor(mask_frame)
        batch["mask_view_to_sam2"] = torch.tensor(view_to_sam2, dtype=torch.float32)


def _nearest_head_frames(processor, media: dict, count: int) -> list[int]:
    """Per SAM2 frame of a video mask sample, the head frame nearest in time (`media["sam2_timestamps"]`
    against the head frames' timestamps), or -1 (every frame's tokens) when the times are unknown."""
    sam2_times = media.get("sam2_timestamps")
    head_times = processor.head_frame_timestamps(list(media.get("timestamps") or []))
    if sam2_times is None or len(sam2_times) != count or not head_times:
        return [-1] * count
    head = np.asarray(head_times, dtype=np.float64)
    return [int(np.abs(head - float(t)).argmin()) for t in sam2_times]
