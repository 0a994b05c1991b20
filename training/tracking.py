"""Single-object tracking with a TPO checkpoint (LaSOT, GOT-10k), the release's way: from the first frame's box,
the mask head segments the target on frame 0 and SAM2's video memory carries the mask through the other frames;
each frame's box is the box of its mask.

Frame 0 (`TrackingConfig.first_frame`):
- "mask_head" (default): the MLLM reads frame 0 with the target's description ("Segment the <description>.",
  the processor's mask prompt, forced to the mask task) and gives the mask task embedding; the mask head
  prompted by it, with the given box as SAM2's box prompt next to it (in place of the box-prompt localiser's
  predicted box, when the head has one), segments frame 0.
- "sam2_box": SAM2's box prompt alone (no MLLM): SAM2 as a tracker, for comparison.
Frames are read from disk, converted to SAM2's input and dropped one at a time, and SAM2 keeps only its memory
window (`MaskHead.track_stream`): memory does not grow with the sequence's length.

Results (`write_tracking_results`), in the toolkits' formats for `examples/evaluate_tpo.py tracking`:
LaSOT `<dir>/<sequence>.txt` (`x,y,w,h` a frame) and `<sequence>_time.txt`; GOT-10k
`<dir>/<sequence>/<sequence>_001.txt` and `<sequence>_time.txt` (seconds per frame). Frame 0's box is the given
box (the toolkits' initialisation); a frame whose mask is empty gets the previous frame's box (or zeros,
`lost_target`).
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..processing.collator_tpo import collate_encoded
from ..processing.pipeline import load_media
from ..processing.processing_tpo import sam2_pixel_values
from ..processing.schema import empty_sample, rle_from_mask
from ..processing.tracking_readers import TrackingSequence

logger = logging.getLogger(__name__)

FIRST_FRAME_PROMPTS = ("mask_head", "sam2_box")
LOST_TARGET_BOXES = ("previous", "zeros")


@dataclass
class TrackingConfig:
    """How a sequence is tracked (see the module docstring)."""

    first_frame: str = field(default="mask_head", metadata={"help": "frame 0: 'mask_head' (MLLM task embedding + "
                                                                    "the box as box prompt) or 'sam2_box'"})
    threshold: float = field(default=0.0, metadata={"help": "mask logit threshold"})
    lost_target: str = field(default="previous", metadata={"help": "box of a frame whose mask is empty: 'previous' "
                                                                   "or 'zeros'"})

    def __post_init__(self):
        if self.first_frame not in FIRST_FRAME_PROMPTS:
            raise ValueError(f"first_frame {self.first_frame!r}: choose one of {list(FIRST_FRAME_PROMPTS)}.")
        if self.lost_target not in LOST_TARGET_BOXES:
            raise ValueError(f"lost_target {self.lost_target!r}: choose one of {list(LOST_TARGET_BOXES)}.")


@dataclass
class TrackResult:
    """One tracked sequence: `boxes_xywh` (n, 4) pixels, `found` (n,) whether the frame's mask was not empty,
    `seconds_per_frame` (n,)."""

    name: str
    boxes_xywh: np.ndarray
    found: np.ndarray
    seconds_per_frame: np.ndarray


def _device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.mask_head.parameters())
    return parameter.device, parameter.dtype


def read_frame(path: str) -> np.ndarray:
    """(h, w, 3) uint8 RGB of one frame file (a MediaError naming the file when it cannot be read)."""
    return load_media({"kind": "image", "path": path})["image"]


def sam2_frames(paths, image_size: int, device, dtype):
    """Yield each frame file as a SAM2 input (3, S, S), reading it only when asked for."""
    for path in paths:
        yield sam2_pixel_values([read_frame(path)], image_size)[0].to(device=device, dtype=dtype)


def sam2_box_from_xywh(box_xywh: np.ndarray, size: tuple[int, int], sam2_size: int) -> torch.Tensor:
    """(x, y, w, h) pixels of a (height, width) frame -> (x0, y0, x1, y1) SAM2 input pixels (the whole frame is
    resized to S x S), clipped to the frame."""
    height, width = size
    x, y, w, h = (float(v) for v in box_xywh)
    corners = np.clip([x, y, x + w, y + h], 0, [width, height, width, height])
    return torch.tensor(corners / np.array([width, height, width, height]) * sam2_size, dtype=torch.float32)


def _box_mask(box_xywh: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    x, y, w, h = box_xywh
    mask = np.zeros((height, width), dtype=bool)
    mask[max(int(y), 0): max(int(np.ceil(y + h)), 0), max(int(x), 0): max(int(np.ceil(x + w)), 0)] = True
    return mask


@torch.no_grad()
def first_frame_mask_logits(model, processor, sequence: TrackingSequence, frame: np.ndarray) -> torch.Tensor:
    """Frame 0's mask logits (h, w) from the mask head: the MLLM's mask task embedding for frame 0 and the target's
    description, and the first box as SAM2's box prompt."""
    size = tuple(sequence.image_size)
    # The processor encodes mask samples with their targets; the first box's mask stands in (no loss is computed).
    sample = empty_sample(id=f"track-{sequence.name}", task="mask", media_type="image",
                          media_path=sequence.frame_paths[0], query=sequence.description, image_size=list(size),
                          masks_rle=[rle_from_mask(_box_mask(sequence.first_box_xywh, size))])
    encoded = processor.encode(sample, mode="force_task")
    batch = collate_encoded(processor, [encoded], [{"image": frame}], padding_side="right")
    device, dtype = _device_and_dtype(model)
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and "pixel_values" in k else v.to(device))
              for k, v in batch.items()
              if torch.is_tensor(v) and k not in ("labels", "task_labels", "mask_targets")}
    embeddings = model(**inputs, logits_to_keep=1).mask_outputs["task_embeddings"]  # (1, k, hidden)
    box = sam2_box_from_xywh(sequence.first_box_xywh, size, model.mask_head.image_size).to(device)
    return model.mask_head(embeddings, sam2_pixel_values=inputs["sam2_pixel_values"],
                           input_boxes=box[None])["pred_mask_logits"][0]


@torch.no_grad()
def track_sequence(model, processor, sequence: TrackingSequence, config: TrackingConfig | None = None) -> TrackResult:
    """Track `sequence` from its first box (see the module docstring); frames are streamed from disk."""
    config = config or TrackingConfig()
    if model.mask_head is None:
        raise ValueError(f"This model has no mask head (tasks={model.config.tasks}); tracking needs the mask task.")
    was_training = model.training
    model.eval()
    device, dtype = _device_and_dtype(model)
    sam2_size = model.mask_head.image_size
    height, width = sequence.image_size
    scale = np.array([width, height, width, height], dtype=np.float64) / sam2_size
    count = len(sequence.frame_paths)
    boxes, found, seconds = np.zeros((count, 4)), np.zeros(count, dtype=bool), np.zeros(count)
    started = time.perf_counter()
    try:
        prompt = {"initial_box": sam2_box_from_xywh(sequence.first_box_xywh, (height, width), sam2_size).to(device)}
        if config.first_frame == "mask_head":
            frame = read_frame(sequence.frame_paths[0])
            prompt = {"initial_mask_logits": first_frame_mask_logits(model, processor, sequence, frame)}
        frames = sam2_frames(sequence.frame_paths, sam2_size, device, dtype)
        steps = model.mask_head.track_stream(frames, threshold=config.threshold, num_frames=count, **prompt)
        for index, step in enumerate(steps):
            found[index] = bool(step["visible"])
            x0, y0, x1, y1 = step["boxes_xyxy"].double().cpu().numpy() * scale
            if index == 0:
                boxes[0] = sequence.first_box_xywh  # the toolkits' initialisation
            elif found[index]:
                boxes[index] = [x0, y0, x1 - x0, y1 - y0]
            elif config.lost_target == "previous":
                boxes[index] = boxes[index - 1]
            now = time.perf_counter()
            seconds[index], started = now - started, now
    finally:
        model.train(was_training)
    lost = count - int(found.sum())
    if lost:
        logger.info("Sequence %s: the mask is empty on %d of %d frames (boxes: %s).", sequence.name, lost, count,
                    config.lost_target)
    return TrackResult(name=sequence.name, boxes_xywh=boxes, found=found, seconds_per_frame=seconds)


def write_tracking_results(result: TrackResult, output_dir: str, protocol: str) -> Path:
    """The result in its toolkit's layout (see the module docstring); returns the boxes file."""
    root = Path(output_dir)
    if protocol == "lasot":
        boxes_path, times_path = root / f"{result.name}.txt", root / f"{result.name}_time.txt"
    elif protocol == "got10k":
        boxes_path = root / result.name / f"{result.name}_001.txt"
        times_path = root / result.name / f"{result.name}_time.txt"
    else:
        raise ValueError(f"Unknown tracking protocol {protocol!r}; choose 'lasot' or 'got10k'.")
    boxes_path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(boxes_path, result.boxes_xywh, fmt="%.3f", delimiter=",")
    np.savetxt(times_path, result.seconds_per_frame, fmt="%.6f")
    return boxes_path
