"""The Trainer's data collator: rows of `encode_dataset` -> decoded media -> one model batch.

Media are decoded here, in the DataLoader workers, one batch at a time (README.md, "Data"). The batching itself
is `collator_tpo.collate_encoded`, which ships with the processor as remote code; this module needs the
project's media loading and is not copied.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .collator_tpo import collate_encoded
from .pipeline import MediaError, load_media
from .processing_tpo import EncodedSample, TPOProcessor

logger = logging.getLogger(__name__)


def row_to_encoded(row: dict) -> EncodedSample:
    return EncodedSample(
        input_ids=list(row["input_ids"]), labels=list(row["labels"]), task_label=int(row["task_label"]),
        instruction_end_index=int(row["instruction_end_index"]), query_token_mask=list(row["query_token_mask"]),
        frame_token_index=list(row["frame_token_index"]), mm_token_type_ids=list(row["mm_token_type_ids"]),
        visual_token_xy=[list(p) for p in row.get("visual_token_xy") or []],
        media=json.loads(row["media_plan"]), targets=json.loads(row["targets"]),
    )


def sample_mask_frames(targets: dict, count: int, generator: torch.Generator | None = None) -> dict:
    """`count` of a video mask sample's annotated frames (`mask_frames`, `masks_rle`), drawn at random without
    replacement and kept in time order; targets with at most `count` frames, or of an image, unchanged.
    Drawn anew each time a sample is batched, so that every frame is supervised over the epochs."""
    frames = targets.get("mask_frames") or []
    if count <= 0 or len(frames) <= count or frames == [-1]:
        return targets
    chosen = sorted(torch.randperm(len(frames), generator=generator)[:count].tolist())
    return {**targets, "mask_frames": [frames[i] for i in chosen],
            "masks_rle": [targets["masks_rle"][i] for i in chosen]}



@dataclass
class TPODataCollator:
    """Decode media and batch encoded samples (rows of `encode_dataset`) for the model.

    Example:
        >>> collator = TPODataCollator(processor)
        >>> batch = collator([encoded[0], encoded[1]])   # rows with input_ids, labels, media_plan, ...
        >>> sorted(batch)[:4]
        ['attention_mask', 'frame_token_index', 'input_ids', 'instruction_end_index']

    `batch["tpo_meta"]` carries `sample_ids`, the media plans and `skipped` (samples whose media could
    not be decoded and were replaced by the last good sample). A video mask sample contributes
    `processor.mask_frames_per_video` of its annotated frames, drawn anew each time (torch's RNG, which the
    Trainer seeds and DataLoader workers derive per epoch).
    """

    processor: TPOProcessor
    media_loader: Callable[[dict, dict], dict] = load_media
    padding_side: str = "right"
    skip_bad_media: bool = True
    _last_good: tuple | None = field(default=None, init=False, repr=False)

    def __call__(self, features: list[dict]) -> dict:
        encoded, media, ids, skipped = [], [], [], 0
        for row in features:
            sample = row_to_encoded(row)
            sample.targets = sample_mask_frames(sample.targets, self.processor.mask_frames_per_video)
            try:
                decoded = self.media_loader(sample.media, sample.targets)
            except MediaError as error:
                if not self.skip_bad_media:
                    raise
                skipped += 1
                logger.warning("Skipping sample %r: %s", row.get("sample_id"), error)
                if self._last_good is None:
                    continue
                sample, decoded, sample_id = self._last_good
                ids.append(sample_id)
                encoded.append(sample)
                media.append(decoded)
                continue
            self._last_good = (sample, decoded, row.get("sample_id"))
            encoded.append(sample)
            media.append(decoded)
            ids.append(row.get("sample_id"))
        if not encoded:
            raise MediaError(
                f"No sample of this batch has readable media ({skipped} failed) and no earlier good sample exists; "
                "check the dataset's media paths."
            )
        batch = collate_encoded(self.processor, encoded, media, padding_side=self.padding_side)
        batch["tpo_meta"].update(sample_ids=ids, skipped=skipped)
        return batch
