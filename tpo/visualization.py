"""PNG visualisations of TPO predictions, drawn with PIL only.

- `render_timeline`: predicted and GT time spans on a time axis, the predicted saliency curve over the
  GT saliency bars, and frame thumbnails placed at their times.
- `render_boxes`: predicted and GT boxes on the image (distinct colours, scores, a legend strip below).
- `render_mask_overlay` / `render_mask_grid`: predicted masks filled over the frames with the GT
  outline, one image or a grid of video frames.

Command line, each reading one JSON file (spans in seconds, boxes in pixels, masks as COCO RLE
`{"size": [H, W], "counts": str}`):

    python -m tpo.visualization timeline --input t.json --output timeline.png
        {"duration": 150, "query": "...", "pred_relevant_windows": [[s, e, score], ...],
         "relevant_windows": [[s, e], ...], "pred_saliency_scores": [one per 2-s clip] (optional),
         "relevant_clip_ids": [...], "saliency_scores": [[a1, a2, a3], ...] (optional, QVHighlights GT),
         "video": "clip.mp4" with "num_thumbnails": 8 (optional) or "frames": [{"time": 12.0,
         "image": "f.jpg"}, ...] (optional)}
    python -m tpo.visualization boxes --input b.json --output boxes.png
        {"image": "img.jpg", "pred_boxes_xyxy": [[x0, y0, x1, y1], ...] or "pred_bbox": [x, y, w, h],
         "pred_scores": [...] (optional), "gt_boxes_xyxy": [...] or "gt_bbox": [x, y, w, h]}
    python -m tpo.visualization masks --input m.json --output masks.png
        {"image": "img.jpg", "pred_mask": RLE, "gt_mask": RLE (optional)}   one image, or
        {"frames": ["00000.jpg", ...], "pred_masks": [RLE or null, ...], "gt_masks": [...] (optional),
         "columns": 4 (optional), "captions": ["frame 0", ...] (optional)}   a grid of video frames
Relative paths in the JSON are resolved against the JSON file's folder.
"""

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .training.metrics.mask import as_mask, boundary_map

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
GT_COLOR = (34, 160, 70)  # green
GT_BAND_COLOR = (226, 244, 230)  # the GT windows shaded behind the prediction rows
PRED_COLORS = ((235, 110, 20), (40, 110, 220), (200, 40, 160), (150, 90, 30), (20, 170, 190), (120, 120, 120))
SALIENCY_COLOR = (40, 110, 220)
GT_SALIENCY_COLOR = (190, 190, 190)
AXIS_COLOR = (60, 60, 60)
TEXT_COLOR = (20, 20, 20)


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _as_rgb_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        raise ValueError(f"Images must be uint8 (H, W, 3) arrays or PIL images, got {array.dtype}.")
    return Image.fromarray(array[..., :3]).convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Timeline
# ----------------------------------------------------------------------------------------------------


@dataclass
class TimelineLayout:
    """Geometry of a timeline image (pixels); rows are `(top, bottom)`, bottom exclusive."""

    width: int
    height: int
    plot_left: int
    plot_right: int
    duration_seconds: float
    title_row: tuple[int, int]
    thumbnail_row: tuple[int, int]
    gt_row: tuple[int, int]
    pred_rows: list[tuple[int, int]]
    saliency_row: tuple[int, int]
    axis_row: tuple[int, int]

    def x_of(self, seconds: float) -> float:
        """The x pixel of a time."""
        fraction = min(max(seconds / self.duration_seconds, 0.0), 1.0)
        return self.plot_left + fraction * (self.plot_right - self.plot_left)


def timeline_layout(duration_seconds: float, num_pred_rows: int, has_saliency: bool, has_thumbnails: bool,
                    has_title: bool, width: int = 1000, thumbnail_height: int = 72) -> TimelineLayout:
    """Where each part of the timeline goes (used by `render_timeline` and by tests)."""
    if duration_seconds <= 0:
        raise ValueError(f"The video duration must be positive, got {duration_seconds}.")
    top = 0

    def row(height: int) -> tuple[int, int]:
        nonlocal top
        span = (top, top + height)
        top += height
        return span

    title = row(26 if has_title else 0)
    thumbnails = row(thumbnail_height + 8 if has_thumbnails else 0)
    gt = row(24)
    preds = [row(20) for _ in range(num_pred_rows)]
    saliency = row(90 if has_saliency else 0)
    axis = row(30)
    return TimelineLayout(width=width, height=top + 4, plot_left=70, plot_right=width - 20,
                          duration_seconds=float(duration_seconds), title_row=title, thumbnail_row=thumbnails,
                          gt_row=gt, pred_rows=preds, saliency_row=saliency, axis_row=axis)


def _tick_step_seconds(duration_seconds: float) -> float:
    for step in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600):
        if duration_seconds / step <= 12:
            return step
    return 3600 * math.ceil(duration_seconds / 3600 / 12)


def _time_label(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}" if seconds % 1 else f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _draw_axis(draw: ImageDraw.ImageDraw, layout: TimelineLayout) -> None:
    y = layout.axis_row[0] + 4
    draw.line([(layout.plot_left, y), (layout.plot_right, y)], fill=AXIS_COLOR, width=1)
    step = _tick_step_seconds(layout.duration_seconds)
    for tick in np.arange(0, layout.duration_seconds + 1e-9, step):
        x = layout.x_of(float(tick))
        draw.line([(x, y), (x, y + 5)], fill=AXIS_COLOR)
        draw.text((x, y + 7), _time_label(float(tick)), fill=AXIS_COLOR, font=_font(11), anchor="ma")


def _draw_span(draw: ImageDraw.ImageDraw, layout: TimelineLayout, row: tuple[int, int], span, color) -> None:
    x0, x1 = layout.x_of(float(span[0])), layout.x_of(float(span[1]))
    draw.rectangle([x0, row[0] + 3, max(x1 - 1, x0), row[1] - 4], fill=color)


def _blend(color, amount: float) -> tuple[int, int, int]:
    """`color` mixed with white: amount 1 is the colour, 0 white."""
    return tuple(int(round(255 - (255 - c) * amount)) for c in color)


def _draw_saliency(draw: ImageDraw.ImageDraw, layout: TimelineLayout, pred_scores, gt_scores,
                   clip_seconds: float) -> None:
    top, bottom = layout.saliency_row[0] + 6, layout.saliency_row[1] - 4
    draw.text((6, top), "saliency", fill=TEXT_COLOR, font=_font(11))
    if gt_scores is not None and len(gt_scores):
        heights = np.asarray(gt_scores, dtype=np.float64).reshape(len(gt_scores), -1).mean(axis=1) / 4.0
        for clip, height in enumerate(heights):
            if height > 0:
                x0, x1 = layout.x_of(clip * clip_seconds), layout.x_of((clip + 1) * clip_seconds)
                draw.rectangle([x0 + 1, bottom - height * (bottom - top), max(x1 - 1, x0 + 1), bottom], fill=GT_SALIENCY_COLOR)
    if pred_scores is not None and len(pred_scores) > 1:
        values = np.asarray(pred_scores, dtype=np.float64)
        spread = values.max() - values.min()
        normalised = (values - values.min()) / spread if spread > 0 else np.full_like(values, 0.5)
        points = [(layout.x_of((i + 0.5) * clip_seconds), bottom - v * (bottom - top)) for i, v in enumerate(normalised)]
        draw.line(points, fill=SALIENCY_COLOR, width=2)


def _draw_thumbnails(canvas: Image.Image, layout: TimelineLayout, frames: list, times_seconds: list,
                     thumbnail_height: int) -> None:
    draw = ImageDraw.Draw(canvas)
    slot_width = (layout.plot_right - layout.plot_left) / max(len(frames), 1)
    for frame, seconds in zip(frames, times_seconds):
        image = _as_rgb_image(frame)
        scale = min(thumbnail_height / image.height, (slot_width - 4) / image.width)
        thumbnail = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.BILINEAR)
        centre = layout.x_of(float(seconds))
        left = int(min(max(centre - thumbnail.width / 2, layout.plot_left), layout.plot_right - thumbnail.width))
        canvas.paste(thumbnail, (left, layout.thumbnail_row[0] + 2))
        draw.line([(centre, layout.thumbnail_row[1] - 5), (centre, layout.thumbnail_row[1])], fill=AXIS_COLOR, width=1)


def render_timeline(duration_seconds: float, pred_windows: list, gt_windows_seconds: list,
                    pred_saliency_scores=None, gt_saliency_scores=None, frames=None, frame_times_seconds=None,
                    query: str | None = None, width: int = 1000, max_pred_rows: int = 10,
                    clip_seconds: float = 2.0, thumbnail_height: int = 72) -> Image.Image:
    """A timeline of predicted vs GT spans, saliency and thumbnails.

    Args:
        duration_seconds: video length.
        pred_windows: `[[start, end, score], ...]` or `[[start, end], ...]` in seconds; drawn one row
            each by descending score (the top one in full colour), at most `max_pred_rows`.
        gt_windows_seconds: `[[start, end], ...]`; drawn in the GT row and shaded behind the others.
        pred_saliency_scores: optional per-clip predicted scores (a curve, min-max scaled).
        gt_saliency_scores: optional `(num_clips, num_annotators)` GT scores 0-4 over the whole video
            (bars of the annotators' mean).
        frames / frame_times_seconds: optional thumbnails `(H, W, 3)` uint8 / PIL and their times.
        query: optional title.
    """
    windows = sorted(([float(v) for v in w] for w in pred_windows), key=lambda w: -(w[2] if len(w) > 2 else 0.0))
    windows = windows[:max_pred_rows]
    has_saliency = pred_saliency_scores is not None or gt_saliency_scores is not None
    has_thumbnails = bool(frames is not None and len(frames))
    layout = timeline_layout(duration_seconds, len(windows), has_saliency, has_thumbnails, bool(query), width,
                             thumbnail_height)
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    band_top = layout.gt_row[1]
    band_bottom = layout.saliency_row[1] if has_saliency else (layout.pred_rows[-1][1] if windows else band_top)
    for span in gt_windows_seconds:  # shading first, everything else is drawn over it
        if band_bottom > band_top:
            draw.rectangle([layout.x_of(span[0]), band_top, max(layout.x_of(span[1]) - 1, layout.x_of(span[0])),
                            band_bottom - 1], fill=GT_BAND_COLOR)
    if query:
        draw.text((6, layout.title_row[0] + 5), query, fill=TEXT_COLOR, font=_font(14))
    if has_thumbnails:
        times = frame_times_seconds if frame_times_seconds is not None else \
            [(i + 0.5) * duration_seconds / len(frames) for i in range(len(frames))]
        _draw_thumbnails(canvas, layout, list(frames), list(times), thumbnail_height)
    draw.text((6, layout.gt_row[0] + 5), "GT", fill=GT_COLOR, font=_font(12))
    for span in gt_windows_seconds:
        _draw_span(draw, layout, layout.gt_row, span, GT_COLOR)
    for rank, (window, row) in enumerate(zip(windows, layout.pred_rows)):
        label = f"#{rank + 1}" + (f" ({window[2]:.2f})" if len(window) > 2 else "")
        draw.text((6, row[0] + 4), label, fill=PRED_COLORS[0], font=_font(11))
        _draw_span(draw, layout, row, window, PRED_COLORS[0] if rank == 0 else _blend(PRED_COLORS[0], 0.45))
    if has_saliency:
        _draw_saliency(draw, layout, pred_saliency_scores, gt_saliency_scores, clip_seconds)
    _draw_axis(draw, layout)
    return canvas


# ----------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------

LEGEND_HEIGHT = 26


def _legend_width(entries: list[tuple[str, tuple]]) -> int:
    font = _font(12)
    return 8 + sum(17 + int(math.ceil(font.getlength(text))) + 16 for text, _ in entries)


def _draw_legend(draw: ImageDraw.ImageDraw, top: int, entries: list[tuple[str, tuple]]) -> None:
    x = 8
    for text, color in entries:
        draw.rectangle([x, top + 7, x + 12, top + 19], fill=color)
        draw.text((x + 17, top + 6), text, fill=TEXT_COLOR, font=_font(12))
        x += 17 + int(math.ceil(_font(12).getlength(text))) + 16


def _canvas_with_legend(picture: Image.Image, entries: list[tuple[str, tuple]]) -> Image.Image:
    """The picture at (0, 0) and a legend strip below it (wider than the picture if the legend needs it)."""
    canvas = Image.new("RGB", (max(picture.width, _legend_width(entries)), picture.height + LEGEND_HEIGHT), BACKGROUND)
    canvas.paste(picture, (0, 0))
    _draw_legend(ImageDraw.Draw(canvas), picture.height, entries)
    return canvas


def render_boxes(image, pred_boxes_xyxy_pixels=(), gt_boxes_xyxy_pixels=(), pred_scores=None,
                 line_width: int = 3) -> Image.Image:
    """The image with GT boxes (green) and predicted boxes (one distinct colour each, score above),
    and a legend strip of `LEGEND_HEIGHT` pixels below it (the canvas is widened if the legend needs
    it); the image keeps its pixel coordinates at the top left.

    Args:
        image: `(H, W, 3)` uint8 array or PIL image.
        pred_boxes_xyxy_pixels / gt_boxes_xyxy_pixels: `(n, 4)` boxes `(x0, y0, x1, y1)` in pixels.
        pred_scores: optional `(n,)` confidences printed with the predicted boxes.
    """
    picture = _as_rgb_image(image).copy()
    draw = ImageDraw.Draw(picture)
    gt = np.asarray(gt_boxes_xyxy_pixels, dtype=np.float64).reshape(-1, 4)
    pred = np.asarray(pred_boxes_xyxy_pixels, dtype=np.float64).reshape(-1, 4)
    for box in gt:
        draw.rectangle(box.tolist(), outline=GT_COLOR, width=line_width)
    for index, box in enumerate(pred):
        color = PRED_COLORS[index % len(PRED_COLORS)]
        draw.rectangle(box.tolist(), outline=color, width=line_width)
        label = f"pred {index + 1}" + (f" {pred_scores[index]:.2f}" if pred_scores is not None else "")
        label_y = box[1] - 15 if box[1] >= 15 else box[1] + line_width  # inside the box near the top edge
        draw.text((box[0] + line_width, label_y), label, fill=color, font=_font(12))
    entries = [("GT", GT_COLOR)] if len(gt) else []
    entries += [(f"pred {i + 1}" if len(pred) > 1 else "prediction", PRED_COLORS[i % len(PRED_COLORS)]) for i in range(len(pred))]
    return _canvas_with_legend(picture, entries)


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def overlay_mask_array(image: np.ndarray, pred_mask, gt_mask=None, alpha: float = 0.5,
                       color=PRED_COLORS[0]) -> np.ndarray:
    """`(H, W, 3)` uint8: the predicted mask blended in `color` (`alpha`), the GT outline in green."""
    array = np.asarray(_as_rgb_image(image), dtype=np.float64)
    if pred_mask is not None:
        mask = as_mask(pred_mask)
        if mask.shape != array.shape[:2]:
            raise ValueError(f"Predicted mask {mask.shape} does not match the image {array.shape[:2]}.")
        array[mask] = array[mask] * (1 - alpha) + np.asarray(color, dtype=np.float64) * alpha
    out = np.round(array).astype(np.uint8)
    if gt_mask is not None:
        gt = as_mask(gt_mask)
        if gt.shape != out.shape[:2]:
            raise ValueError(f"GT mask {gt.shape} does not match the image {out.shape[:2]}.")
        out[boundary_map(gt) | boundary_map(gt[::-1, ::-1])[::-1, ::-1]] = GT_COLOR  # outline on both sides
    return out


def render_mask_overlay(image, pred_mask, gt_mask=None, alpha: float = 0.5) -> Image.Image:
    """One image with the predicted mask filled and the GT outlined, plus a legend strip below."""
    overlay = Image.fromarray(overlay_mask_array(image, pred_mask, gt_mask, alpha))
    return _canvas_with_legend(overlay, [("prediction", PRED_COLORS[0])] +
                               ([("GT outline", GT_COLOR)] if gt_mask is not None else []))


CAPTION_HEIGHT = 18


def render_mask_grid(frames: list, pred_masks: list, gt_masks: list | None = None, columns: int = 4,
                     tile_width: int = 240, alpha: float = 0.5, captions: list[str] | None = None) -> Image.Image:
    """A grid of video frames (row-major, `columns` a row), each `tile_width` wide with a caption strip
    of `CAPTION_HEIGHT` pixels above it, the predicted mask filled and the GT outlined.

    Args:
        frames: per frame `(H, W, 3)` uint8 or PIL (all the same size).
        pred_masks: per frame a mask (array / RLE) or `None`.
        gt_masks: optional per frame a mask or `None`.
    """
    if not len(frames):
        raise ValueError("render_mask_grid needs at least one frame.")
    if len(pred_masks) != len(frames) or (gt_masks is not None and len(gt_masks) != len(frames)):
        raise ValueError(f"{len(frames)} frames, {len(pred_masks)} predicted masks"
                         f"{'' if gt_masks is None else f', {len(gt_masks)} GT masks'}: give one mask (or None) per frame.")
    first = _as_rgb_image(frames[0])
    tile_height = max(1, int(round(first.height * tile_width / first.width)))
    columns = max(1, min(columns, len(frames)))
    rows = math.ceil(len(frames) / columns)
    canvas = Image.new("RGB", (columns * tile_width, rows * (tile_height + CAPTION_HEIGHT)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, frame in enumerate(frames):
        gt = gt_masks[index] if gt_masks is not None else None
        tile = Image.fromarray(overlay_mask_array(frame, pred_masks[index], gt, alpha)).resize((tile_width, tile_height),
                                                                                                 Image.NEAREST)
        left, top = (index % columns) * tile_width, (index // columns) * (tile_height + CAPTION_HEIGHT)
        canvas.paste(tile, (left, top + CAPTION_HEIGHT))
        draw.text((left + 4, top + 3), captions[index] if captions else f"frame {index}", fill=TEXT_COLOR, font=_font(11))
    return canvas


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _resolve(base: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else base / candidate


def _load_image(base: Path, path: str) -> Image.Image:
    resolved = _resolve(base, path)
    if not resolved.exists():
        raise FileNotFoundError(f"{resolved}: image not found (paths are relative to the JSON file).")
    with Image.open(resolved) as image:
        return image.convert("RGB")


def _gt_saliency_from_record(record: dict):
    if "saliency_scores" not in record:
        return None
    from .training.metrics.qvhighlights import gt_clip_scores

    return gt_clip_scores(record)


def _timeline_from_json(record: dict, base: Path) -> Image.Image:
    frames, times = None, None
    if record.get("video"):
        from .processing.video import load_video

        clip = load_video(_resolve(base, record["video"]), num_frames=int(record.get("num_thumbnails", 8)))
        frames, times = list(clip.frames), clip.metadata.timestamps_seconds
    elif record.get("frames"):
        frames = [_load_image(base, f["image"]) for f in record["frames"]]
        times = [float(f["time"]) for f in record["frames"]]
    return render_timeline(float(record["duration"]), record.get("pred_relevant_windows", []),
                           record.get("relevant_windows", []), record.get("pred_saliency_scores"),
                           _gt_saliency_from_record(record), frames, times, record.get("query"))


def _boxes_field(record: dict, prefix: str) -> np.ndarray:
    from .training.metrics.region import xywh_to_xyxy

    if f"{prefix}_boxes_xyxy" in record:
        return np.asarray(record[f"{prefix}_boxes_xyxy"], dtype=np.float64).reshape(-1, 4)
    if record.get(f"{prefix}_bbox"):
        return xywh_to_xyxy(record[f"{prefix}_bbox"])
    return np.zeros((0, 4))


def _boxes_from_json(record: dict, base: Path) -> Image.Image:
    return render_boxes(_load_image(base, record["image"]), _boxes_field(record, "pred"), _boxes_field(record, "gt"),
                        record.get("pred_scores"))


def _masks_from_json(record: dict, base: Path) -> Image.Image:
    if "frames" in record:
        frames = [np.asarray(_load_image(base, path)) for path in record["frames"]]
        return render_mask_grid(frames, record.get("pred_masks", [None] * len(frames)), record.get("gt_masks"),
                                int(record.get("columns", 4)), captions=record.get("captions"))
    return render_mask_overlay(_load_image(base, record["image"]), record.get("pred_mask"), record.get("gt_mask"))


RENDERERS = {"timeline": _timeline_from_json, "boxes": _boxes_from_json, "masks": _masks_from_json}


def render_record(kind: str, record: dict, base_dir: str | Path = ".") -> Image.Image:
    """Render one record of the command line's JSON input formats (see the module docstring) without a
    file: `kind` is "timeline", "boxes" or "masks"; relative paths in `record` resolve against `base_dir`.
    `examples/evaluate_tpo.py predict --visualize` uses it (and writes each record next to its PNG)."""
    if kind not in RENDERERS:
        raise ValueError(f"Unknown visualisation {kind!r}; choose one of {sorted(RENDERERS)}.")
    return RENDERERS[kind](record, Path(base_dir))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Input formats: see `python -c 'import tpo.visualization as v; help(v)'`.")
    parser.add_argument("kind", choices=sorted(RENDERERS))
    parser.add_argument("--input", required=True, help="JSON file describing what to draw (see the module docstring)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    source = Path(args.input)
    try:
        record = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not valid JSON ({error}).") from error
    image = render_record(args.kind, record, source.parent)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output, format="PNG")
    logger.info("wrote %s (%dx%d)", args.output, image.width, image.height)
    return args.output


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
