"""TPOProcessor: prompts with task tokens, visual placeholders, targets, and the inverse transforms.

Copied next to checkpoints as remote code (`AutoProcessor.from_pretrained(..., trust_remote_code=True)`):
it imports only numpy, PIL, torch and transformers at module level; pycocotools (RLE) is imported
where it is needed. It does no file I/O: media arrive decoded (see `tpo.processing.pipeline`).

Coordinate conventions
----------------------
- Boxes in samples are `(x0, y0, x1, y1)` in pixels of the ORIGINAL image. Targets given to the
  model are normalised to the image the vision tower sees: for a processor that resizes the whole
  image (SigLIP, Qwen2-VL's smart resize) that is simply x / width, y / height; LLaVA's pad-to-square
  (`do_pad`, centred) shifts the shorter side by the padding; a shortest-edge resize followed by a
  centre crop (CLIP) shifts by the crop offset and boxes are clamped to the crop. LLaVA-OneVision sees
  the whole image twice (a plain resize to the base resolution, and an aspect-preserving tiling whose
  padding tokens the model drops), so its boxes and `visual_token_xy` are both normalised to the
  original image, x / width, y / height (`LlavaOnevisionLayout`). `post_process_boxes` inverts exactly
  the same mapping (`TPOProcessor.geometry`, `image_geometry`).
- Spans in samples are `(start, end)` in seconds; targets are normalised by the video duration.
- Frames: the MLLM sees `num_frames` frames sampled at the middle of equal segments; for Qwen2-VL
  two consecutive frames form one temporal token group, and a group's timestamp is the mean of its
  frames'. The temporal head works on these "head frames" (`frame_timestamps`).
- Masks: COCO RLE in samples; targets are resized (nearest) to SAM2's square input size.
"""

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .rle import mask_from_rle, rle_from_mask  # copied with this file (remote code): numpy only at import

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TASK_LABELS = {"text": 0, "temporal": 1, "region": 2, "mask": 3}
DEFAULT_TASK_TOKENS = {
    "temporal": {"begin": "<time_begin>", "slots": ["<temp>"]},
    "region": {"begin": "<box_begin>", "slots": ["<boxes>"]},
    "mask": {"begin": "<mask_begin>", "slots": ["<masks>"]},
}
# Question templates per task; the template of a sample is chosen from a hash of its id (stable).
DEFAULT_PROMPT_TEMPLATES = {
    "temporal": [
        "When is the {query} visible in the video?",
        "Find the moments of the video that show the {query}.",
        "During which part of the video can the {query} be seen?",
    ],
    "region": [
        "Where is the {query} in the image?",
        "Locate the {query}.",
        "Give the bounding box of the {query}.",
    ],
    "mask": [
        "Segment the {query}.",
        "Which pixels belong to the {query}?",
        "Give the mask of the {query}.",
    ],
}
SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# Small, testable helpers
# ------------------------------------------------------------------------------------------------
def uniform_timestamps(duration_seconds: float, num_frames: int) -> list[float]:
    """Middle of `num_frames` equal segments of [0, duration]."""
    return [(i + 0.5) * duration_seconds / num_frames for i in range(num_frames)]


def dense_clip_timestamps(duration_seconds: float, clip_seconds: float, max_clips: int) -> list[float]:
    """Centres of the clips that dense temporal features sample: (i + 0.5) * clip_seconds for the
    ceil(duration / clip_seconds) clips of the video (QVHighlights: 2-second clips, 75 for 150 s, exactly the clip
    grid its saliency is scored on), at most `max_clips` (longer videos get longer, equal clips); the last centre
    is clamped to the duration."""
    count = max(1, math.ceil(duration_seconds / clip_seconds - 1e-9))
    if count > max_clips:
        count, clip_seconds = max_clips, duration_seconds / max_clips
    return [min((i + 0.5) * clip_seconds, duration_seconds) for i in range(count)]


def frame_saliency(
    frame_timestamps: list[float], clip_seconds: float, clip_ids: list[int], clip_scores: list[list[int]]
) -> list[float]:
    """Per-frame saliency in [0, 1]: mean annotator score / 4 of the clip holding the frame (0 if the
    clip is not annotated as relevant)."""
    by_clip = {int(c): float(np.mean(s)) / 4.0 for c, s in zip(clip_ids, clip_scores)}
    return [by_clip.get(int(t // clip_seconds), 0.0) if clip_seconds > 0 else 0.0 for t in frame_timestamps]


# Grounding answers in text coordinates instead of task tokens (`TPOProcessor(text_coordinate_tasks=...)`): boxes
# as Qwen2.5-VL writes them, `[x0, y0, x1, y1]` in whole pixels of the image, spans as seconds with one decimal.
TEXT_COORDINATE_TASKS = ("temporal", "region")  # masks have no text-coordinate format
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_BOX_TEXT = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")
_SPAN_TEXT = re.compile(rf"from\s+{_NUMBER}\s+to\s+{_NUMBER}\s+seconds?", re.IGNORECASE)


def format_box_text(box_xyxy_pixels) -> str:
    """(x0, y0, x1, y1) pixels -> "[x0, y0, x1, y1]" in whole pixels (Qwen2.5-VL's grounding format)."""
    return "[" + ", ".join(str(int(round(float(v)))) for v in box_xyxy_pixels) + "]"


def format_spans_text(spans_seconds) -> str:
    """[(start, end), ...] seconds -> "from 2.5 to 6.0 seconds" (one decimal), several joined by " and "."""
    return " and ".join(f"from {float(s):.1f} to {float(e):.1f} seconds" for s, e in spans_seconds)


def parse_box_text(text: str) -> list[float] | None:
    """The first "[x0, y0, x1, y1]" of a text as floats, or None when there is none or it is empty
    (x1 <= x0 or y1 <= y0)."""
    match = _BOX_TEXT.search(text or "")
    if match is None:
        return None
    box = [float(v) for v in match.groups()]
    return box if box[2] > box[0] and box[3] > box[1] else None


def parse_spans_text(text: str) -> list[list[float]] | None:
    """Every "from S to E seconds" of a text, in order, as [[S, E], ...]; None when there is none or one has
    E <= S (a malformed answer is a miss, not a partial one)."""
    spans = [[float(s), float(e)] for s, e in _SPAN_TEXT.findall(text or "")]
    return spans if spans and all(e > s for s, e in spans) else None


@dataclass
class ImageGeometry:
    """How an original image maps onto the image the vision tower sees.

    `scale` multiplies original pixels; the result is cropped by (`crop_x`, `crop_y`) to a
    (`view_width`, `view_height`) view. A plain resize is `scale_x = view_width / width` etc.
    """

    width: float
    height: float
    scale_x: float
    scale_y: float
    crop_x: float = 0.0
    crop_y: float = 0.0
    view_width: float = 1.0
    view_height: float = 1.0

    def normalise(self, boxes_xyxy_pixels: np.ndarray) -> np.ndarray:
        """(n, 4) original pixels -> (n, 4) normalised to the view, clamped to [0, 1]."""
        boxes = np.asarray(boxes_xyxy_pixels, dtype=np.float64).reshape(-1, 4)
        x = (boxes[:, [0, 2]] * self.scale_x - self.crop_x) / self.view_width
        y = (boxes[:, [1, 3]] * self.scale_y - self.crop_y) / self.view_height
        out = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
        return np.clip(out, 0.0, 1.0)

    def denormalise(self, boxes_normalised: np.ndarray) -> np.ndarray:
        """(n, 4) normalised view coordinates -> (n, 4) original pixels (inverse of `normalise`)."""
        boxes = np.asarray(boxes_normalised, dtype=np.float64).reshape(-1, 4)
        x = (boxes[:, [0, 2]] * self.view_width + self.crop_x) / self.scale_x
        y = (boxes[:, [1, 3]] * self.view_height + self.crop_y) / self.scale_y
        out = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.height)
        return out


def _size_setting(setting) -> dict:
    if setting is None:
        return {}
    if isinstance(setting, dict):
        return {k: v for k, v in setting.items() if v is not None}
    return {k: getattr(setting, k) for k in ("height", "width", "shortest_edge", "longest_edge")
            if getattr(setting, k, None) is not None}


def _resized_size(size: dict, height: int, width: int) -> tuple[int, int]:
    """(height, width) after transformers' resize with `size` (shortest edge as `get_resize_output_image_size`
    computes it, or a fixed height x width)."""
    if "shortest_edge" in size and "longest_edge" not in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(size["shortest_edge"]), int(int(size["shortest_edge"]) * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return height, width


def image_geometry(image_processor, height: int, width: int) -> ImageGeometry:
    """The geometry of `image_processor` on an image of (height, width), in the order transformers applies
    the steps: LLaVA's `do_pad` pad-to-square (centred, before resizing), then the resize (whole image to
    height x width, or shortest edge), then `do_center_crop` to `crop_size` (offsets floor((in - crop) / 2)).

    Without a centre crop a resize keeps normalised coordinates (x / width, y / height); padding and cropping
    move them, and `ImageGeometry.normalise` / `denormalise` account for both. Any-resolution processors
    (`image_grid_pinpoints`: LLaVA-NeXT, LLaVA-OneVision) use `do_pad` to pad the tile count for batching and
    resize their base image whole, so they keep x / width, y / height (see `LlavaOnevisionLayout`).
    """
    pad_x = pad_y = 0
    padded_w, padded_h = width, height
    pads_to_square = (getattr(image_processor, "do_pad", False) and hasattr(image_processor, "pad_to_square")
                      and not getattr(image_processor, "image_grid_pinpoints", None))
    if pads_to_square and height != width:
        side = max(height, width)
        pad_x, pad_y = ((side - width) // 2, 0) if height > width else (0, (side - height) // 2)
        padded_w = padded_h = side
    resized_h, resized_w = padded_h, padded_w
    if getattr(image_processor, "do_resize", True):
        resized_h, resized_w = _resized_size(_size_setting(getattr(image_processor, "size", None)), padded_h, padded_w)
    crop = _size_setting(getattr(image_processor, "crop_size", None))
    crop_x = crop_y = 0.0
    view_w, view_h = resized_w, resized_h
    if getattr(image_processor, "do_center_crop", False) and "height" in crop and "width" in crop:
        view_h, view_w = int(crop["height"]), int(crop["width"])
        crop_x, crop_y = float((resized_w - view_w) // 2), float((resized_h - view_h) // 2)
    scale_x, scale_y = resized_w / padded_w, resized_h / padded_h
    return ImageGeometry(
        width=width, height=height, scale_x=scale_x, scale_y=scale_y,
        crop_x=crop_x - pad_x * scale_x, crop_y=crop_y - pad_y * scale_y, view_width=view_w, view_height=view_h,
    )


decode_rle = mask_from_rle  # the processor's names for `rle.py`'s checked COCO RLE coding
encode_rle = rle_from_mask


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a (h, w) mask to (size, size), float32 in {0, 1}."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return (np.asarray(image.resize((size, size), Image.NEAREST)) > 127).astype(np.float32)


def sam2_pixel_values(images: list[np.ndarray], image_size: int) -> torch.Tensor:
    """SAM2 input: each (h, w, 3) uint8 image resized (bilinear) to image_size x image_size, scaled
    to [0, 1] and normalised with ImageNet mean/std, as SAM2 does -> (m, 3, S, S) float32."""
    mean = np.asarray(SAM2_MEAN, dtype=np.float32)
    std = np.asarray(SAM2_STD, dtype=np.float32)
    out = []
    for image in images:
        resized = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize(
            (image_size, image_size), Image.BILINEAR
        )
        array = (np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std
        out.append(array.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 3, image_size, image_size)


# ------------------------------------------------------------------------------------------------
# Visual layouts: how a backbone turns images and videos into placeholder tokens and pixel tensors
# ------------------------------------------------------------------------------------------------
@dataclass
class VisualTokens:
    """The placeholder expansion of one image or video: `frame_ids[j]` is the head-frame index of
    the j-th copy (-1 for still images)."""

    token_id: int
    frame_ids: list[int]
    wrap: tuple[int, int] | None = None  # (start, end) tokens to put around the copies if missing
    xy: list[tuple[float, float]] | None = None  # each copy's patch centre in its image, normalised

    def positions(self) -> list[tuple[float, float]]:
        return self.xy if self.xy is not None else [(-1.0, -1.0)] * len(self.frame_ids)


def grid_positions(rows: int, cols: int) -> list[tuple[float, float]]:
    """Centres (x, y) in [0, 1] of a rows x cols token grid, row-major."""
    return [((c + 0.5) / cols, (r + 0.5) / rows) for r in range(rows) for c in range(cols)]


def square_grid_positions(count: int) -> list[tuple[float, float]] | None:
    """Centres of `count` tokens forming a square grid (LLaVA), or None if `count` is not a square."""
    side = math.isqrt(count)
    return grid_positions(side, side) if side * side == count else None


class VisualLayout:
    """What every layout shares: the processor it serves, no `mm_token_type_ids`, boxes normalised as
    `image_geometry` says, and every sampled frame a head frame. Subclasses give `model_types`,
    `settings_from_config`, the token layouts and `pixel_inputs`."""

    model_types: tuple[str, ...] = ()
    uses_mm_token_type_ids = False
    dense_clips_as_images = True  # dense temporal features: each clip frame through the image path

    def __init__(self, processor: "TPOProcessor"):
        self.processor = processor

    def geometry(self, image_processor, height: int, width: int) -> ImageGeometry:
        return image_geometry(image_processor, height, width)

    def head_frame_timestamps(self, timestamps: list[float]) -> list[float]:
        return list(timestamps)

    def dense_pixel_inputs(self, frames: list[np.ndarray]) -> dict:
        """The vision tower's inputs for dense clip frames ((h, w, 3) uint8 each), every frame an image, keys
        prefixed `dense_` (`dense_pixel_values`, `dense_image_grid_thw`, ...)."""
        return {f"dense_{key}": value for key, value in self.pixel_inputs([("image", f) for f in frames]).items()}


class LlavaLayout(VisualLayout):
    """LLaVA-style: a fixed number of tokens per image; a video is a sequence of images (one per
    frame), so every sampled frame is a head frame."""

    model_types = ("llava",)

    @classmethod
    def settings_from_config(cls, mllm_config, tokenizer, image_processor) -> dict:
        """The processor settings this layout needs from the MLLM's configuration. A video's placeholders are its
        frames' image tokens: LLaVA tokenizers have no video token (llava-1.5's has `<image>` = 32000 only)."""
        image_token = tokenizer.convert_ids_to_tokens(mllm_config.image_token_id)
        return {"image_seq_length": mllm_config.image_seq_length, "image_token": image_token,
                "video_token": image_token}

    def video_as_images(self) -> bool:
        return True

    def image_tokens(self, height: int, width: int) -> VisualTokens:
        count = self.processor.image_seq_length
        return VisualTokens(self.processor.image_token_id, [-1] * count, xy=square_grid_positions(count))

    def frame_tokens(self, frame_index: int) -> VisualTokens:
        count = self.processor.image_seq_length
        return VisualTokens(self.processor.image_token_id, [frame_index] * count, xy=square_grid_positions(count))

    def pixel_inputs(self, items: list[tuple[str, np.ndarray]]) -> dict:
        frames = [f for kind, array in items for f in ([array] if kind == "image" else list(array))]
        if not frames:
            return {}
        return {"pixel_values": self.processor.image_processor(images=frames, return_tensors="pt")["pixel_values"]}


class Qwen2VLLayout(VisualLayout):
    """Qwen2-VL / Qwen2.5-VL: tokens per image from the (smart-)resized size and the 2x2 merge; a
    video is one placeholder whose tokens come in temporal groups of `temporal_patch_size` frames."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    uses_mm_token_type_ids = True

    def __init__(self, processor: "TPOProcessor"):
        super().__init__(processor)
        ip = processor.image_processor
        self.patch = ip.patch_size
        self.merge = ip.merge_size
        self.temporal = ip.temporal_patch_size

    @classmethod
    def settings_from_config(cls, mllm_config, tokenizer, image_processor) -> dict:
        vocab = tokenizer.convert_ids_to_tokens
        return {"image_token": vocab(mllm_config.image_token_id), "video_token": vocab(mllm_config.video_token_id),
                "vision_start_token": vocab(mllm_config.vision_start_token_id),
                "vision_end_token": vocab(mllm_config.vision_end_token_id)}

    def video_as_images(self) -> bool:
        return False

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size = self.processor.image_processor.size
        size = dict(size) if not isinstance(size, dict) else size
        return smart_resize(height, width, factor=self.patch * self.merge,
                            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])

    def _wrap(self) -> tuple[int, int]:
        return (self.processor.vision_start_token_id, self.processor.vision_end_token_id)

    def _merged_grid(self, height: int, width: int) -> tuple[int, int]:
        h, w = self._resized(height, width)
        return h // (self.patch * self.merge), w // (self.patch * self.merge)

    def image_tokens(self, height: int, width: int) -> VisualTokens:
        rows, cols = self._merged_grid(height, width)
        return VisualTokens(self.processor.image_token_id, [-1] * (rows * cols), self._wrap(),
                            xy=grid_positions(rows, cols))

    def video_tokens(self, num_frames: int, height: int, width: int) -> VisualTokens:
        rows, cols = self._merged_grid(height, width)
        groups = math.ceil(num_frames / self.temporal)
        return VisualTokens(self.processor.video_token_id, [g for g in range(groups) for _ in range(rows * cols)],
                            self._wrap(), xy=grid_positions(rows, cols) * groups)

    def head_frame_timestamps(self, timestamps: list[float]) -> list[float]:
        padded = list(timestamps) + [timestamps[-1]] * (-len(timestamps) % self.temporal)
        return [float(np.mean(padded[i : i + self.temporal])) for i in range(0, len(padded), self.temporal)]

    def _normalised(self, image: np.ndarray, height: int, width: int) -> np.ndarray:
        ip = self.processor.image_processor
        resized = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((width, height), Image.BICUBIC)
        array = np.asarray(resized, dtype=np.float32) * float(ip.rescale_factor)
        array = (array - np.asarray(ip.image_mean, dtype=np.float32)) / np.asarray(ip.image_std, dtype=np.float32)
        return array.transpose(2, 0, 1)  # (C, H, W)

    def video_patches(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(T, H, W, 3) uint8 -> (groups * gh * gw, C * temporal * patch * patch) patches and grid (t, gh, gw)."""
        height, width = self._resized(frames.shape[1], frames.shape[2])
        video = np.stack([self._normalised(f, height, width) for f in frames])  # (T, C, H, W)
        if pad := -len(video) % self.temporal:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        t, c = len(video) // self.temporal, video.shape[1]
        gh, gw, p, m = height // self.patch, width // self.patch, self.patch, self.merge
        patches = video.reshape(t, self.temporal, c, gh // m, m, p, gw // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(t * gh * gw, c * self.temporal * p * p), [t, gh, gw]

    def pixel_inputs(self, items: list[tuple[str, np.ndarray]]) -> dict:
        images = [array for kind, array in items if kind == "image"]
        videos = [array for kind, array in items if kind == "video"]
        out = {}
        if images:
            processed = self.processor.image_processor(images=list(images), return_tensors="pt")
            out.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
        if videos:
            patches, grids = zip(*(self.video_patches(np.asarray(v)) for v in videos))
            out.update(pixel_values_videos=torch.from_numpy(np.concatenate(patches)).float(),
                       video_grid_thw=torch.tensor(grids, dtype=torch.long))
        return out


def _tile_size(image_processor) -> int:
    """Tile side in pixels of an any-resolution image processor (as its `_preprocess` picks it)."""
    crop = _size_setting(getattr(image_processor, "crop_size", None))
    size = _size_setting(getattr(image_processor, "size", None))
    return int(crop.get("height") or size.get("height") or size["shortest_edge"])


def _resized_into(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(height, width) of an image resized into (target_height, target_width) keeping its aspect ratio,
    as transformers' `get_patch_output_size` rounds it."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


class LlavaOnevisionLayout(VisualLayout):
    """LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): any-resolution tiling for images, pooled
    base-resolution frames for videos. S is the tile side in pixels (the image processor's `size`, equal to
    the vision tower's `image_size`), P = S / patch size the tokens per tile side (`image_seq_length` = P^2).

    An image becomes, in the order of `LlavaOnevisionModel.pack_image_features`:
      1. the base image: the whole image resized to S x S (aspect ratio not kept), P x P tokens, row-major;
      2. the tile grid: the image resized, keeping its aspect ratio, into the best `image_grid_pinpoints`
         resolution (bh, bw), centred on a zero canvas and cut into (bh / S) x (bw / S) tiles of P x P tokens;
         the model stitches them into one (bh / S * P) x (bw / S * P) grid, drops the rows (or columns) of
         padding (`unpad_image`), shrinks the grid bilinearly when it holds more than N tiles' worth of tokens
         (`vision_aspect_ratio` "anyres_max_N") and appends a newline token to each of its `rows` rows.
    That is P^2 + rows * (cols + 1) `<image>` tokens (the processor's `_get_number_of_features`).
    `visual_token_xy`: the base tokens get the centres of a P x P grid over the whole image, the tile-grid
    tokens their cell centres mapped from the canvas back to the original image (clipped to [0, 1]: a kept
    edge cell may reach into the padding by a fraction of a cell), the newline tokens -1.

    A video frame is resized to S x S (the base image, through the same image processor) and its P x P tokens
    are pooled bilinearly to ceil(P / 2)^2 (`apply_pooling`); the frames' tokens follow each other and ONE
    newline token ends the video: T * ceil(P / 2)^2 + 1 `<video>` tokens, the newline with frame index -1.
    Every sampled frame is a head frame.

    Boxes: normalised to the original image, (x / width, y / height). The base image is a plain resize of
    the whole image, and the tile grid covers the whole image once the model has dropped its padding (up to
    a fraction of a token cell at the padded edges: the model unpads in whole cells), so this is the frame
    both views share and the one `visual_token_xy` uses; `post_process_boxes` multiplies back by the original
    size. (The image processor's `do_pad` pads the tile count for batching, not the image to a square, so
    LLaVA-1.5's pad-to-square convention does not apply.)
    """

    model_types = ("llava_onevision",)
    dense_clips_as_images = False  # its image path tiles every frame (any resolution); not wired for dense clips

    def __init__(self, processor: "TPOProcessor"):
        super().__init__(processor)
        ip = processor.image_processor
        count = processor.image_seq_length
        side = math.isqrt(count) if count else 0
        if not count or side * side != count:
            raise ValueError(
                f"The llava_onevision layout needs `image_seq_length` = tokens per tile, a square "
                f"((vision image_size / patch_size)^2), got {count!r}; build the processor with "
                "TPOProcessor.from_model_config or pass image_seq_length."
            )
        if not getattr(ip, "image_grid_pinpoints", None):
            raise ValueError(f"The llava_onevision layout needs an any-resolution image processor with "
                             f"`image_grid_pinpoints` (LlavaOnevisionImageProcessor), got {type(ip).__name__}.")
        self.tokens_per_side = side
        self.tile_pixels = _tile_size(ip)
        self.pinpoints = [[int(h), int(w)] for h, w in ip.image_grid_pinpoints]
        aspect = str(processor.vision_aspect_ratio)
        if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_"):].isdigit():
            raise ValueError(f"Unknown vision_aspect_ratio {aspect!r}; LLaVA-OneVision uses 'anyres_max_N'.")
        self.max_tiles = int(aspect[len("anyres_max_"):])

    @classmethod
    def settings_from_config(cls, mllm_config, tokenizer, image_processor) -> dict:
        """Placeholder tokens, tokens per tile and `vision_aspect_ratio` from a `LlavaOnevisionConfig`; raises
        if the image processor tiles differently from what the model unpacks."""
        vision = mllm_config.vision_config
        tile = int(vision.image_size)
        if _tile_size(image_processor) != tile:
            raise ValueError(
                f"The image processor cuts {_tile_size(image_processor)} px tiles but the vision tower takes "
                f"{tile} px images: use the checkpoint's image processor (size={{'height': {tile}, 'width': {tile}}})."
            )
        pinpoints = [list(p) for p in getattr(image_processor, "image_grid_pinpoints", None) or []]
        if pinpoints != [list(p) for p in mllm_config.image_grid_pinpoints]:
            raise ValueError(
                f"The image processor's image_grid_pinpoints {pinpoints} differ from the model's "
                f"{mllm_config.image_grid_pinpoints}: the placeholder count would not match the features; use the "
                "checkpoint's image processor."
            )
        vocab = tokenizer.convert_ids_to_tokens
        return {"image_token": vocab(mllm_config.image_token_id), "video_token": vocab(mllm_config.video_token_id),
                "image_seq_length": (tile // int(vision.patch_size)) ** 2,
                "vision_aspect_ratio": mllm_config.vision_aspect_ratio}

    def geometry(self, image_processor, height: int, width: int) -> ImageGeometry:
        """Normalised coordinates of the original image (see the class docstring)."""
        return ImageGeometry(width=width, height=height, scale_x=1.0, scale_y=1.0, view_width=width,
                             view_height=height)

    def video_as_images(self) -> bool:
        return False

    def tile_grid(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Centres of the tile-grid tokens after unpadding and the anyres_max shrink, normalised to the
        original (height, width) image: xs (cols,), ys (rows,); the grid is rows x cols, row-major."""
        from transformers.image_processing_utils import select_best_resolution

        side, tile = self.tokens_per_side, self.tile_pixels
        best_h, best_w = select_best_resolution((height, width), self.pinpoints)
        grid_h, grid_w = best_h // tile * side, best_w // tile * side
        # `unpad_image`, in token cells
        top = left = 0
        if width / height > grid_w / grid_h:
            top = (grid_h - int(round(height * (grid_w / width), 7))) // 2
        else:
            left = (grid_w - int(round(width * (grid_h / height), 7))) // 2
        kept_h, kept_w = grid_h - 2 * top, grid_w - 2 * left
        rows, cols = kept_h, kept_w
        ratio = math.sqrt(kept_h * kept_w / (self.max_tiles * side**2))
        if ratio > 1.1:  # bilinear shrink (align_corners=False): output cell i spans input cells i * k .. (i + 1) * k
            rows, cols = int(kept_h // ratio), int(kept_w // ratio)
        cell_h, cell_w = best_h / grid_h, best_w / grid_w  # canvas pixels per token cell
        ys_canvas = (top + (np.arange(rows) + 0.5) * kept_h / rows) * cell_h
        xs_canvas = (left + (np.arange(cols) + 0.5) * kept_w / cols) * cell_w
        # canvas -> original: the image was resized to (new_h, new_w) and pasted at the centre
        new_h, new_w = _resized_into(height, width, best_h, best_w)
        ys = (ys_canvas - (best_h - new_h) // 2) / new_h
        xs = (xs_canvas - (best_w - new_w) // 2) / new_w
        return np.clip(xs, 0.0, 1.0), np.clip(ys, 0.0, 1.0)

    def image_tokens(self, height: int, width: int) -> VisualTokens:
        xs, ys = self.tile_grid(height, width)
        newline = (-1.0, -1.0)
        tiles = [p for y in ys for p in [*((float(x), float(y)) for x in xs), newline]]
        xy = grid_positions(self.tokens_per_side, self.tokens_per_side) + tiles
        return VisualTokens(self.processor.image_token_id, [-1] * len(xy), xy=xy)

    def video_tokens(self, num_frames: int, height: int, width: int) -> VisualTokens:
        pooled = math.ceil(self.tokens_per_side / 2)
        per_frame = pooled * pooled
        frame_ids = [f for f in range(num_frames) for _ in range(per_frame)] + [-1]
        xy = grid_positions(pooled, pooled) * num_frames + [(-1.0, -1.0)]
        return VisualTokens(self.processor.video_token_id, frame_ids, xy=xy)

    def pixel_inputs(self, items: list[tuple[str, np.ndarray]]) -> dict:
        """pixel_values (images, max tiles + 1, 3, S, S) zero-padded over tiles, image_sizes (images, 2) as
        (height, width); pixel_values_videos (videos, T, 3, S, S): each frame as the image processor's base
        image (whole frame resized to S x S; the processor is run with the single pinpoint S x S and its
        first tile kept)."""
        ip = self.processor.image_processor
        images = [np.asarray(array) for kind, array in items if kind == "image"]
        videos = [np.asarray(array) for kind, array in items if kind == "video"]
        out = {}
        if images:
            processed = ip(images=images, do_pad=True, return_tensors="pt")
            out.update(pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"].long())
        if videos:
            lengths = sorted({len(v) for v in videos})
            if len(lengths) > 1:
                raise ValueError(f"LLaVA-OneVision batches videos as one (videos, frames, ...) tensor, but the videos "
                                 f"of this batch have {lengths} frames; sample the same num_frames for every video.")
            tile = self.tile_pixels
            frames = [frame for video in videos for frame in video]
            base = ip(images=frames, image_grid_pinpoints=[[tile, tile]], do_pad=True, return_tensors="pt")
            out["pixel_values_videos"] = base["pixel_values"][:, 0].reshape(len(videos), lengths[0],
                                                                           *base["pixel_values"].shape[2:])
        return out


LAYOUTS = {model_type: layout for layout in (LlavaLayout, Qwen2VLLayout, LlavaOnevisionLayout)
           for model_type in layout.model_types}


# ------------------------------------------------------------------------------------------------
# The processor
# ------------------------------------------------------------------------------------------------
@dataclass
class EncodedSample:
    """Token-side encoding of one sample (what `Dataset.map` stores), media not included."""

    input_ids: list[int]
    labels: list[int]
    task_label: int
    instruction_end_index: int
    query_token_mask: list[int]
    frame_token_index: list[int]
    mm_token_type_ids: list[int]
    visual_token_xy: list[list[float]] = field(default_factory=list)  # (seq, 2), -1 for non-visual tokens
    media: dict = field(default_factory=dict)  # plan: kind, path, timestamps, image size, ...
    targets: dict = field(default_factory=dict)


class TPOProcessor(ProcessorMixin):
    r"""
    Wraps an MLLM's tokenizer and image processor for TPO.

    Args:
        image_processor: the MLLM's image processor (a PIL backend works without torchvision).
        tokenizer: the MLLM's tokenizer; the task tokens of every task are added to it.
        chat_template (`str`, *optional*): defaults to the tokenizer's.
        layout (`str`): the MLLM's `model_type` (`llava`, `qwen2_vl`, `qwen2_5_vl`, `llava_onevision`), which
            decides how images and videos become placeholder tokens and pixel tensors.
        num_frames (`int`): frames the MLLM sees per video.
        image_seq_length (`int`, *optional*): tokens per image (LLaVA); tokens per tile, (vision image_size /
            patch_size)^2 (LLaVA-OneVision).
        vision_aspect_ratio (`str`): LLaVA-OneVision's "anyres_max_N": the tile grid is shrunk to about N tiles'
            worth of tokens (the model config's `vision_aspect_ratio`).
        image_token, video_token, vision_start_token, vision_end_token (`str`): placeholder tokens.
        sam2_image_size (`int`, *optional*): SAM2's input size (mask samples).
        mask_frames_per_video (`int`): annotated frames of a video mask sample given to SAM2 per training step,
            drawn anew at random each time the sample is batched (`sample_mask_frames`); evaluation uses all.
        task_token_strings (`dict`, *optional*): `{task: {"begin": str, "slots": [str]}}`.
        prompt_templates (`dict`, *optional*): `{task: [template with {query}, ...]}`.
        saliency_clip_seconds (`float`): clip length of saliency annotations (QVHighlights: 2).
        dense_clip_seconds (`float`): > 0 plans dense temporal features for temporal samples: besides the
            `num_frames` frames of the MLLM, one frame per clip of this length (the temporal head's
            `dense_clip_seconds`; `from_model_config` copies it), whose saliency targets come per clip.
        dense_max_clips (`int`): at most this many clips per video (longer videos get longer clips).
        question_before_media (`bool`): put a grounding question before the image/video in the user turn
            (default: after, as pretrained MLLMs are trained). Before, the LLM's causal attention lets every
            visual token read the question, so its hidden states are question-aware: an MLLM trained from
            scratch (the embedded default) learns to ground far sooner.
        text_coordinate_tasks (`list[str]`, *optional*): grounding tasks answered in text coordinates instead of
            task tokens: region boxes as Qwen2.5-VL writes them, `[x0, y0, x1, y1]` in whole pixels of the original
            image (`format_box_text`), temporal spans as `from 2.5 to 6.0 seconds` (`format_spans_text`). Such
            samples are trained with the LM loss on that text (task label "text", no head targets) and evaluated
            by generating and parsing it (`parse_text_coordinates`). Masks have no text format.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        layout: str = "llava",
        num_frames: int = 8,
        image_seq_length: int | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_start_token: str | None = None,
        vision_end_token: str | None = None,
        sam2_image_size: int | None = None,
        mask_frames_per_video: int = 4,
        task_token_strings: dict | None = None,
        prompt_templates: dict | None = None,
        saliency_clip_seconds: float = 2.0,
        question_before_media: bool = False,
        vision_aspect_ratio: str = "anyres_max_9",
        dense_clip_seconds: float = 0.0,
        dense_max_clips: int = 256,
        text_coordinate_tasks: list[str] | None = None,
        **kwargs,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown layout {layout!r}; supported MLLM model types: {sorted(LAYOUTS)}.")
        self.layout = layout
        self.num_frames = int(num_frames)
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        self.video_token = video_token
        self.vision_start_token = vision_start_token
        self.vision_end_token = vision_end_token
        self.sam2_image_size = sam2_image_size
        self.mask_frames_per_video = int(mask_frames_per_video)
        self.task_token_strings = task_token_strings or json.loads(json.dumps(DEFAULT_TASK_TOKENS))
        self.prompt_templates = prompt_templates or json.loads(json.dumps(DEFAULT_PROMPT_TEMPLATES))
        self.saliency_clip_seconds = float(saliency_clip_seconds)
        self.question_before_media = bool(question_before_media)
        self.vision_aspect_ratio = vision_aspect_ratio
        self.dense_clip_seconds = float(dense_clip_seconds)
        self.dense_max_clips = int(dense_max_clips)
        if self.dense_clip_seconds < 0 or self.dense_max_clips < 2:
            raise ValueError(f"`dense_clip_seconds` must be >= 0 (0: off) and `dense_max_clips` >= 2, got "
                             f"{dense_clip_seconds} and {dense_max_clips}.")
        self.text_coordinate_tasks = list(text_coordinate_tasks or [])
        unknown = [task for task in self.text_coordinate_tasks if task not in TEXT_COORDINATE_TASKS]
        if unknown:
            raise ValueError(f"text_coordinate_tasks {unknown}: only {list(TEXT_COORDINATE_TASKS)} have a text-coordinate "
                             "answer format (masks have none); answer the others with task tokens.")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self._add_task_tokens()
        self._layout = LAYOUTS[layout](self)
        if self.dense_clip_seconds and not self._layout.dense_clips_as_images:
            raise ValueError(f"`dense_clip_seconds`={self.dense_clip_seconds}: dense temporal features are not "
                             f"available for the {layout!r} layout (its image path tiles every frame); use 0 for it.")

    # ---- tokens -------------------------------------------------------------------------------
    def _add_task_tokens(self) -> None:
        strings = [s for entry in self.task_token_strings.values() for s in [entry["begin"], *entry["slots"]]]
        missing = [s for s in strings if s not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        self.task_token_ids = {
            task: {"begin": self.tokenizer.convert_tokens_to_ids(entry["begin"]),
                   "slots": self.tokenizer.convert_tokens_to_ids(entry["slots"])}
            for task, entry in self.task_token_strings.items()
        }

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no token {token!r}; set the processor's placeholder tokens.")
        return token_id

    @property
    def image_token_id(self) -> int:
        return self._token_id(self.image_token)

    @property
    def video_token_id(self) -> int:
        return self._token_id(self.video_token)

    @property
    def vision_start_token_id(self) -> int | None:
        return self._token_id(self.vision_start_token)

    @property
    def vision_end_token_id(self) -> int | None:
        return self._token_id(self.vision_end_token)

    @property
    def uses_mm_token_type_ids(self) -> bool:
        """Whether the MLLM takes `mm_token_type_ids` (0 text, 1 image, 2 video) from the collator."""
        return self._layout.uses_mm_token_type_ids

    def geometry(self, height: int, width: int) -> ImageGeometry:
        """How an original image of (height, width) maps onto the normalised coordinates of boxes and
        `visual_token_xy` (the layout's convention; see the module docstring)."""
        return self._layout.geometry(self.image_processor, int(height), int(width))

    def check_model_config(self, config) -> None:
        """Raise if the model's task-token ids differ from this processor's (another tokenizer)."""
        if config.task_token_ids != self.task_token_ids:
            raise ValueError(
                f"The processor's task-token ids {self.task_token_ids} differ from the model's "
                f"{config.task_token_ids}: the model was built with another tokenizer. Build both from the same "
                "tokenizer (TPOForConditionalGeneration.from_mllm(..., tokenizer=processor.tokenizer))."
            )

    @classmethod
    def from_model_config(cls, config, image_processor, tokenizer, **kwargs) -> "TPOProcessor":
        """A processor matching a `TPOConfig` (layout, placeholder tokens, tokens per image)."""
        mllm = config.mllm_config
        if mllm.model_type not in LAYOUTS:
            raise ValueError(f"No processor layout for the MLLM model type {mllm.model_type!r}; supported: "
                             f"{sorted(LAYOUTS)}.")
        settings = {"layout": mllm.model_type, "task_token_strings": config.task_token_strings,
                    **LAYOUTS[mllm.model_type].settings_from_config(mllm, tokenizer, image_processor)}
        if getattr(config, "sam2_config", None) is not None and "mask" in config.tasks:
            settings["sam2_image_size"] = int(config.sam2_config.image_size)
        if "temporal" in config.tasks:
            settings["dense_clip_seconds"] = float(config.temporal_head_config.get("dense_clip_seconds", 0.0))
            settings["dense_max_clips"] = int(config.temporal_head_config.get("dense_max_clips", 256))
        settings.update(kwargs)
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, **settings)
        processor.check_model_config(config)
        return processor

    # ---- conversation building ------------------------------------------------------------------
    def _question(self, sample: dict) -> str:
        templates = self.prompt_templates[sample["task"]]
        digest = int(hashlib.sha1(str(sample.get("id", "")).encode()).hexdigest(), 16)
        return templates[digest % len(templates)].format(query=sample["query"])

    def task_answer(self, task: str) -> str:
        entry = self.task_token_strings[task]
        return entry["begin"] + "".join(entry["slots"])

    def grounding_answer(self, sample: dict) -> str:
        """The assistant's answer to a grounding sample: its task's tokens, or its text coordinates (the first box;
        every span) when the task is one of `text_coordinate_tasks`."""
        task = sample["task"]
        if task not in self.text_coordinate_tasks:
            return self.task_answer(task)
        if task == "region":
            return format_box_text(sample["boxes_xyxy_pixels"][0])
        return format_spans_text(sample["spans_seconds"])

    def parse_text_coordinates(self, task: str, text: str):
        """A generated text-coordinate answer -> a box [x0, y0, x1, y1] in pixels (region) or [[start, end], ...]
        seconds (temporal); None when the text holds no well-formed answer (a miss)."""
        return parse_box_text(text) if task == "region" else parse_spans_text(text)

    def _messages(self, sample: dict, mode: str) -> list[dict]:
        """Chat messages with typed content parts; visual parts in the order of the media."""
        task = sample["task"]
        visual = {"image": "image", "video": "video", "frames": "video"}.get(sample.get("media_type", "none"))
        if task == "text":
            messages = [
                {"role": turn["role"], "content": _split_placeholders(turn["content"], self.image_token, self.video_token)}
                for turn in sample["conversations"]
            ]
            if visual and not any(p["type"] in ("image", "video") for m in messages for p in m["content"]):
                messages[0]["content"].insert(0, {"type": visual})
            if mode != "train" and messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            return messages
        media = [{"type": visual}] if visual else []
        question = [{"type": "text", "text": self._question(sample)}]
        user = question + media if self.question_before_media else media + question
        messages = [{"role": "user", "content": user}]
        if mode == "train":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": self.grounding_answer(sample)}]})
        return messages

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, sample: dict, mode: str = "train") -> EncodedSample:
        """Token-side encoding of one sample of the common schema.

        `mode`: "train" (answer included, `labels` on the answer turns), "generate" (prompt with the
        generation prompt, no answer) or "force_task" (prompt + the task's begin and slot tokens, so
        that one forward pass gives the head outputs).
        Needs `image_size` (images, video frames) and `duration_seconds` (videos) in the sample.
        """
        if sample["task"] not in TASK_LABELS:
            raise ValueError(f"Sample {sample.get('id')!r}: unknown task {sample['task']!r}; valid: {list(TASK_LABELS)}.")
        if mode not in ("train", "generate", "force_task"):
            raise ValueError(f"Unknown mode {mode!r}; use 'train', 'generate' or 'force_task'.")
        media = self._plan_media(sample)
        targets = self._targets(sample, media)  # checks the annotations before they become an answer
        if sample["task"] in self.text_coordinate_tasks:  # answered in text: the LM's labels are the targets
            targets = {}
        messages = self._messages(sample, mode)
        if self._layout.video_as_images() and media.get("kind") == "video":
            for message in messages:
                message["content"] = _video_to_frames(message["content"], len(media["timestamps"]))
        text, answer_spans, query_spans = self._render_with_spans(messages, mode, sample)
        if mode == "force_task":
            if sample["task"] == "text" or sample["task"] in self.text_coordinate_tasks:
                raise ValueError(f"Sample {sample.get('id')!r}: 'force_task' needs a grounding task answered with task "
                                 f"tokens, not {sample['task']!r} answered in text; use mode 'generate'.")
            text += self.task_answer(sample["task"])
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        if mode == "train":
            labels = [tid if _inside(o, answer_spans) else IGNORE_INDEX for tid, o in zip(ids, offsets)]
        else:
            labels = [IGNORE_INDEX] * len(ids)
        query = [int(_inside(o, query_spans)) for o in offsets]
        ids, labels, query, frame_index, mm_types, token_xy = self._expand_visual_tokens(ids, labels, query, media,
                                                                                        sample)
        if mode == "train" and any(label != IGNORE_INDEX for label in labels):
            prompt_end = _first_answer_token(labels) - 1
        elif mode == "force_task":  # the instruction ends before the forced begin + slot tokens
            prompt_end = len(ids) - 2 - len(self.task_token_strings[sample["task"]]["slots"])
        else:
            prompt_end = len(ids) - 1
        return EncodedSample(
            input_ids=ids,
            labels=labels,
            task_label=TASK_LABELS["text" if sample["task"] in self.text_coordinate_tasks else sample["task"]],
            instruction_end_index=max(prompt_end, 0),
            query_token_mask=query,
            frame_token_index=frame_index,
            mm_token_type_ids=mm_types,
            visual_token_xy=token_xy,
            media=media,
            targets=targets,
        )

    def _render_with_spans(self, messages, mode, sample):
        """The rendered text, the char spans of assistant answers (labels) and of the last user text."""
        add_prompt = mode != "train" or messages[-1]["role"] != "assistant"
        text = self._render(messages, add_generation_prompt=add_prompt)
        answer_spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render(messages[:i], add_generation_prompt=True)
            upto = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(prefix) and text.startswith(upto)):
                raise ValueError(
                    f"Sample {sample.get('id')!r}: the chat template does not render conversations prefix by prefix, "
                    "so answer tokens cannot be located for the labels; use a template whose rendering of the first "
                    "i turns is a prefix of the whole conversation."
                )
            answer_spans.append((len(prefix), len(upto)))
        query_spans = []
        user_turns = [m for m in messages if m["role"] == "user"]
        if user_turns:
            for part in user_turns[-1]["content"]:
                if part["type"] == "text" and part["text"].strip():
                    start = text.rfind(part["text"])
                    if start >= 0:
                        query_spans.append((start, start + len(part["text"])))
        return text, answer_spans, query_spans

    def _plan_media(self, sample: dict) -> dict:
        kind = sample.get("media_type", "none")
        height, width = (list(sample.get("image_size") or [0, 0]) + [0, 0])[:2]
        if kind == "image":
            if not (height and width):
                raise ValueError(f"Sample {sample.get('id')!r}: `image_size` (height, width) is needed for an image.")
            return {"kind": "image", "path": sample["media_path"], "height": int(height), "width": int(width)}
        if kind in ("video", "frames"):
            if kind == "frames":
                fps = float(sample.get("fps") or 0.0)
                count = len(sample.get("frame_paths") or [])
                duration = float(sample.get("duration_seconds") or (count / fps if fps > 0 else 0.0))
            else:
                duration = float(sample.get("duration_seconds") or 0.0)
            if duration <= 0:
                raise ValueError(f"Sample {sample.get('id')!r}: `duration_seconds` must be > 0 for a video.")
            if not (height and width):
                raise ValueError(f"Sample {sample.get('id')!r}: `image_size` (frame height, width) is needed for a video.")
            timestamps = (self._clip_timestamps(sample, duration) if sample.get("clip_seconds")
                          else uniform_timestamps(duration, self.num_frames))
            plan = {"kind": "video", "source": kind, "path": sample.get("media_path", ""),
                    "frame_paths": list(sample.get("frame_paths") or []), "fps": float(sample.get("fps") or 0.0),
                    "timestamps": timestamps, "duration": duration, "height": int(height), "width": int(width)}
            if self.dense_clip_seconds and sample.get("task") == "temporal":
                plan["dense_timestamps"] = self._dense_plan(sample, plan)
                plan["dense_clip_seconds"] = self.dense_clip_seconds
            return plan
        return {"kind": "none"}

    def _dense_plan(self, sample: dict, plan: dict) -> list[float]:
        """The dense clips' times of a temporal sample; refuses more clips than the video has frames (when the
        sample says how many it has)."""
        times = dense_clip_timestamps(plan["duration"], self.dense_clip_seconds, self.dense_max_clips)
        available = len(plan["frame_paths"]) if plan["source"] == "frames" else round(plan["fps"] * plan["duration"])
        if available and len(times) > available:
            raise ValueError(dense_clips_error(sample.get("id"), len(times), available, self.dense_clip_seconds,
                                               plan["duration"]))
        return times

    def dense_pixel_inputs(self, frames: list[np.ndarray]) -> dict:
        """The MLLM's vision inputs for dense clip frames, keys prefixed `dense_` (see the layouts)."""
        return self._layout.dense_pixel_inputs(frames)

    def temporal_frame_timestamps(self, media_plan: dict, decoded_timestamps: list[float]) -> list[float]:
        """The temporal head's frame times of a video sample: its dense clips' centres when it has them, else the
        head frames of the MLLM's frames (`head_frame_timestamps`)."""
        if media_plan.get("dense_timestamps"):
            return list(media_plan["dense_timestamps"])
        return self.head_frame_timestamps(list(decoded_timestamps))

    def _clip_timestamps(self, sample: dict, duration: float) -> list[float]:
        """Frame times inside the sample's `clip_seconds` [start, end] (MVBench's bounds): the middle of
        `num_frames` equal segments of [start, min(end, duration)]. Text samples only (the targets of grounding
        samples are relative to the whole video)."""
        start, end = (float(v) for v in sample["clip_seconds"])
        if sample["task"] != "text":
            raise ValueError(f"Sample {sample.get('id')!r}: `clip_seconds` is supported for text samples only, "
                             f"not {sample['task']!r} (their spans are relative to the whole video).")
        end = min(end, duration)
        if not 0 <= start < end:
            raise ValueError(f"Sample {sample.get('id')!r}: clip_seconds {list(sample['clip_seconds'])} holds no part "
                             f"of the {duration:.3f} s video; it needs 0 <= start < end <= duration.")
        return [start + t for t in uniform_timestamps(end - start, self.num_frames)]

    def _expand_visual_tokens(self, ids, labels, query, media, sample):
        """Replace each image/video placeholder by its expansion; returns ids, labels, query mask,
        frame index per token, mm_token_type_ids (0 text, 1 image, 2 video) and each token's patch
        centre (x, y) in its image ((-1, -1) for non-visual tokens)."""
        image_id, video_id = self.image_token_id, self.video_token_id
        placeholders = [i for i, t in enumerate(ids) if t in (image_id, video_id)]
        expansions = self._expansions(ids, placeholders, media, sample)
        out_ids, out_labels, out_query, out_frames, out_types, out_xy = [], [], [], [], [], []
        cursor = 0
        for position, visual in zip(placeholders, expansions):
            out_ids += ids[cursor:position]
            out_labels += labels[cursor:position]
            out_query += query[cursor:position]
            out_frames += [-1] * (position - cursor)
            out_types += [0] * (position - cursor)
            out_xy += [(-1.0, -1.0)] * (position - cursor)
            before = out_ids[-1] if out_ids else None
            after = ids[position + 1] if position + 1 < len(ids) else None
            wrap_start, wrap_end = visual.wrap if visual.wrap else (None, None)
            add_start = wrap_start is not None and before != wrap_start
            add_end = wrap_end is not None and after != wrap_end
            kind = 2 if visual.token_id == video_id and video_id != image_id else 1
            block = ([wrap_start] if add_start else []) + [visual.token_id] * len(visual.frame_ids) + (
                [wrap_end] if add_end else [])
            frames = ([-1] if add_start else []) + visual.frame_ids + ([-1] if add_end else [])
            types = ([0] if add_start else []) + [kind] * len(visual.frame_ids) + ([0] if add_end else [])
            out_ids += block
            out_labels += [IGNORE_INDEX] * len(block)
            out_query += [0] * len(block)
            out_frames += frames
            out_types += types
            out_xy += ([(-1.0, -1.0)] if add_start else []) + visual.positions() + ([(-1.0, -1.0)] if add_end else [])
            cursor = position + 1
        out_ids += ids[cursor:]
        out_labels += labels[cursor:]
        out_query += query[cursor:]
        out_frames += [-1] * (len(ids) - cursor)
        out_types += [0] * (len(ids) - cursor)
        out_xy += [(-1.0, -1.0)] * (len(ids) - cursor)
        return out_ids, out_labels, out_query, out_frames, out_types, [list(p) for p in out_xy]

    def _expansions(self, ids, placeholders, media, sample) -> list[VisualTokens]:
        kind = media.get("kind")
        if kind == "none" and placeholders:
            raise ValueError(f"Sample {sample.get('id')!r} has {len(placeholders)} visual placeholder(s) but no media.")
        if kind == "image":
            if len(placeholders) != 1:
                raise ValueError(f"Sample {sample.get('id')!r}: one image but {len(placeholders)} placeholders.")
            return [self._layout.image_tokens(media["height"], media["width"])]
        if kind == "video":
            if self._layout.video_as_images():
                if len(placeholders) != len(media["timestamps"]):
                    raise ValueError(f"Sample {sample.get('id')!r}: {len(media['timestamps'])} frames but "
                                     f"{len(placeholders)} placeholders.")
                return [self._layout.frame_tokens(i) for i in range(len(placeholders))]
            if len(placeholders) != 1:
                raise ValueError(f"Sample {sample.get('id')!r}: one video but {len(placeholders)} placeholders.")
            return [self._layout.video_tokens(len(media["timestamps"]), media["height"], media["width"])]
        return []

    # ---- targets ----------------------------------------------------------------------------------
    def _targets(self, sample: dict, media: dict) -> dict:
        task = sample["task"]
        sample_id = sample.get("id")
        if task == "region":
            boxes = np.asarray(sample.get("boxes_xyxy_pixels") or [], dtype=np.float64).reshape(-1, 4)
            if len(boxes) != 1:
                raise ValueError(f"Sample {sample_id!r}: a region sample needs exactly one box, got {len(boxes)}.")
            if media.get("kind") != "image":
                raise ValueError(f"Sample {sample_id!r}: region samples need an image.")
            if not np.isfinite(boxes).all():
                raise ValueError(f"Sample {sample_id!r}: box {boxes[0].tolist()} is not finite; give (x0, y0, x1, y1) pixels.")
            geometry = self.geometry(media["height"], media["width"])
            return {"region_boxes": geometry.normalise(boxes).tolist()}
        if task == "temporal":
            duration = media.get("duration")
            spans = np.asarray(sample.get("spans_seconds") or [], dtype=np.float64).reshape(-1, 2)
            if media.get("kind") != "video":
                raise ValueError(f"Sample {sample_id!r}: temporal samples need a video.")
            if len(spans) == 0:
                raise ValueError(f"Sample {sample_id!r}: a temporal sample needs at least one span.")
            bad = ~(spans[:, 0] < spans[:, 1]) | ~(spans[:, 0] >= 0) | ~(spans[:, 1] <= duration + 1e-3)  # NaN: bad
            if bad.any():
                raise ValueError(
                    f"Sample {sample_id!r}: span {spans[bad][0].tolist()} s is invalid for a video of {duration:.3f} s "
                    "(needs 0 <= start < end <= duration)."
                )
            head_times = self.temporal_frame_timestamps(media, media["timestamps"])
            saliency = frame_saliency(head_times, float(sample.get("saliency_clip_seconds") or self.saliency_clip_seconds),
                                      list(sample.get("saliency_clip_ids") or []), list(sample.get("saliency_scores") or []))
            if not any(saliency):  # no clip annotation: saliency from the spans themselves
                saliency = [float(any(s <= t <= e for s, e in spans)) for t in head_times]
            return {"temporal_spans": (np.minimum(spans, duration) / duration).tolist(), "temporal_saliency": saliency}
        if task == "mask":
            masks = list(sample.get("masks_rle") or [])
            if not masks:
                raise ValueError(f"Sample {sample_id!r}: a mask sample needs at least one mask.")
            if self.sam2_image_size is None:
                raise ValueError("The processor has no `sam2_image_size`: mask samples need SAM2 settings.")
            height, width = media.get("height"), media.get("width")
            for rle in masks:
                if [int(v) for v in rle["size"]] != [height, width]:
                    raise ValueError(
                        f"Sample {sample_id!r}: a mask of size {list(rle['size'])} does not match its frame "
                        f"({height}, {width}); masks must have the frame's size."
                    )
            frame_indices = list(sample.get("mask_frame_indices") or [])
            if media.get("kind") == "image":
                return {"masks_rle": masks[:1], "mask_frames": [-1]}
            if len(frame_indices) != len(masks):
                raise ValueError(f"Sample {sample_id!r}: {len(masks)} masks but {len(frame_indices)} mask frame indices.")
            # Every annotated frame: evaluation scores them all; training draws `mask_frames_per_video` of them
            # anew for each step (`sample_mask_frames`, in the collator).
            return {"masks_rle": masks, "mask_frames": [int(i) for i in frame_indices]}
        return {}

    # ---- media -> tensors (collator side) -----------------------------------------------------------
    def pixel_inputs(self, items: list[tuple[str, np.ndarray]]) -> dict:
        """Pixel tensors for the MLLM from decoded media in placeholder order: ("image", (h, w, 3)) or
        ("video", (T, h, w, 3)) uint8 arrays."""
        return self._layout.pixel_inputs(items)

    def head_frame_timestamps(self, timestamps: list[float]) -> list[float]:
        return self._layout.head_frame_timestamps(timestamps)

    def view_to_sam2(self, height: int, width: int) -> list[float]:
        """(a_x, b_x, a_y, b_y): an image of (height, width)'s normalised coordinates in the vision tower's
        view (those of `visual_token_xy` and region boxes) -> normalised coordinates of the whole image
        (SAM2's input), x = a_x * x_view + b_x; the identity for a plain resize."""
        geometry = self.geometry(int(height), int(width))
        a_x = geometry.view_width / (geometry.scale_x * geometry.width)
        a_y = geometry.view_height / (geometry.scale_y * geometry.height)
        return [a_x, geometry.crop_x / (geometry.scale_x * geometry.width),
                a_y, geometry.crop_y / (geometry.scale_y * geometry.height)]

    def sam2_inputs(self, images: list[np.ndarray], masks_rle: list[dict] | None = None) -> dict:
        """SAM2 pixel values (m, 3, S, S) and, if given, mask targets (m, S, S)."""
        if self.sam2_image_size is None:
            raise ValueError("The processor has no `sam2_image_size`: set it to SAM2's input size for mask samples.")
        out = {"sam2_pixel_values": sam2_pixel_values(images, self.sam2_image_size)}
        if masks_rle is not None:
            targets = [resize_mask(decode_rle(rle), self.sam2_image_size) for rle in masks_rle]
            out["mask_targets"] = torch.from_numpy(np.stack(targets)) if targets else torch.zeros(0, 1, 1)
        return out

    # ---- inference convenience ------------------------------------------------------------------------
    def pipeline(self, model, **kwargs):
        """A `TPOPipeline` of `model` with this processor: `pipe(media, question)` (see `pipeline_tpo`). Saving the
        processor saves the pipeline's code with it, so that `transformers.pipeline(model=folder,
        trust_remote_code=True)` builds the same pipeline from a checkpoint folder."""
        from .pipeline_tpo import PIPELINE_TASK, TPOPipeline

        return TPOPipeline(model=model, processor=self, task=PIPELINE_TASK, **kwargs)

    def __call__(self, samples: list[dict] | dict, media: list[dict] | dict | None = None, mode: str = "generate",
                 return_tensors: str = "pt", **kwargs):
        """Encode samples of the common schema with their decoded media for inference and return a
        padded batch (left padding for generation). `media[i]`: {"image": (h, w, 3)} or {"frames":
        (T, h, w, 3), "timestamps": [...]}. See `tpo.processing.data_collator.TPODataCollator` for training.
        Returns a `BatchFeature` of `return_tensors` tensors ("pt", "np"; None: as collated, torch) plus the
        per-sample metadata `tpo_meta`, which is left unconverted."""
        from .collator_tpo import collate_encoded

        if isinstance(samples, dict):
            samples, media = [samples], [media]
        encoded = [self.encode(s, mode=mode) for s in samples]
        batch = collate_encoded(self, encoded, media, padding_side="left" if mode != "train" else "right")
        meta = batch.pop("tpo_meta")
        features = BatchFeature(data=batch, tensor_type=return_tensors)
        features["tpo_meta"] = meta
        return features

    # ---- post-processing ----------------------------------------------------------------------------
    def post_process_boxes(self, pred_boxes: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[list[float]]:
        """Normalised (x0, y0, x1, y1) boxes, one per query, -> pixels of each query's original image
        (image_sizes: (height, width) per query)."""
        boxes = pred_boxes.detach().float().cpu().numpy().reshape(-1, 4)
        out = []
        for box, (height, width) in zip(boxes, image_sizes):
            out.append(self.geometry(height, width).denormalise(box[None])[0].tolist())
        return out

    def post_process_spans(self, windows: list[list[tuple[float, float, float]]], durations: list[float]) -> list[list[list[float]]]:
        """Per query, normalised (start, end, score) windows -> [start_s, end_s, score] in seconds,
        clipped to [0, duration] (the QVHighlights `pred_relevant_windows` format)."""
        out = []
        for query_windows, duration in zip(windows, durations):
            out.append([[float(np.clip(s, 0, 1) * duration), float(np.clip(e, 0, 1) * duration), float(score)]
                        for s, e, score in query_windows])
        return out

    def post_process_saliency(self, saliency: torch.Tensor, frame_timestamps: list[list[float]],
                              durations: list[float]) -> list[list[float]]:
        """Per query, per-head-frame saliency -> one score per 2-second clip of the video (the
        QVHighlights `pred_saliency_scores` format): each clip takes the score of the nearest frame."""
        scores = saliency.detach().float().cpu().numpy()
        out = []
        for row, times, duration in zip(scores, frame_timestamps, durations):
            times = np.asarray(times, dtype=np.float64)
            valid = times >= 0
            times, values = times[valid], row[: len(valid)][valid]
            num_clips = max(1, int(math.ceil(duration / self.saliency_clip_seconds)))
            centers = (np.arange(num_clips) + 0.5) * self.saliency_clip_seconds
            nearest = np.abs(centers[:, None] - times[None, :]).argmin(1) if len(times) else np.zeros(num_clips, int)
            out.append(values[nearest].tolist() if len(times) else [0.0] * num_clips)
        return out

    def post_process_masks(self, mask_logits: torch.Tensor, original_sizes: list[tuple[int, int]],
                           threshold: float = 0.0, return_rle: bool = True) -> list[dict]:
        """(m, h, w) mask logits -> per mask a bool (H, W) array at the original size and its COCO RLE."""
        out = []
        for logits, (height, width) in zip(mask_logits.detach().float().cpu(), original_sizes):
            resized = torch.nn.functional.interpolate(logits[None, None], size=(int(height), int(width)),
                                                      mode="bilinear", align_corners=False)[0, 0]
            binary = (resized > threshold).numpy()
            out.append({"mask": binary, **({"rle": encode_rle(binary)} if return_rle else {})})
        return out

    def post_process_mask_boxes(self, boxes: torch.Tensor, original_sizes: list[tuple[int, int]]) -> list[list[float]]:
        """Boxes of predicted masks (or tracking boxes), normalised (x0, y0, x1, y1) of the frame as
        `generate` / `track_masks` give them, -> pixels of each frame's original size ((height, width) per
        box). SAM2 sees the whole frame resized, so this is a plain scaling (no crop to undo)."""
        rows = boxes.detach().float().cpu().numpy().reshape(-1, 4)
        return [(row * np.array([width, height, width, height], dtype=np.float64)).tolist()
                for row, (height, width) in zip(rows, original_sizes)]


def dense_clips_error(sample_id, clips: int, frames: int, clip_seconds: float, duration: float) -> str:
    return (f"Sample {sample_id!r}: `dense_clip_seconds`={clip_seconds} asks for {clips} clips of its {duration:.2f} s "
            f"video, which has only {frames} frames; use longer clips (a larger dense_clip_seconds) or drop the video.")


def _split_placeholders(text: str, image_token: str, video_token: str) -> list[dict]:
    """"<image>\nWhat is it?" -> [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]."""
    parts, rest = [], text
    while rest:
        positions = [(rest.find(tok), kind) for tok, kind in ((image_token, "image"), (video_token, "video")) if tok in rest]
        if not positions:
            parts.append({"type": "text", "text": rest})
            break
        index, kind = min(positions)
        if index > 0:
            parts.append({"type": "text", "text": rest[:index]})
        parts.append({"type": kind})
        rest = rest[index + len(image_token if kind == "image" else video_token):]
    return parts


def _video_to_frames(content: list[dict], num_frames: int) -> list[dict]:
    out = []
    for part in content:
        out += [{"type": "image"}] * num_frames if part["type"] == "video" else [part]
    return out


def _inside(offset, spans) -> bool:
    start, end = offset
    return end > start and any(s <= start and end <= e for s, e in spans)


def _first_answer_token(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


TPOProcessor.register_for_auto_class()

__all__ = ["TPOProcessor"]
