"""The synthetic benchmark: coloured shapes over textured backgrounds, every answer known exactly.

Written as real files in the real formats, so that the real readers load them:
    temporal/      QVHighlights-style jsonl per split + mp4 videos (PyAV, H.264): when is the shape visible
    refcoco/       COCO instances json (boxes xywh, RLE masks) + RefCOCO refs json + PNG images: where / which pixels
    mevis/         MeViS-style meta_expressions.json + mask_dict.json per split + JPEG frame folders: video masks
    conversation/  LLaVA-style json per split: open and multiple-choice questions on images and videos
    manifest.json  every file per split and part, paths relative to the manifest's folder

What the scenes and questions hold, and why: README.md, "Does the model ground the query?". Seeded per
(seed, split, task, index): the same seed gives byte-identical annotation files.

    python -m tpo.processing.synthetic --out DIR [--size small|default] [--seed 0]
"""

import argparse
import json
import logging
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .schema import rle_from_mask

logger = logging.getLogger(__name__)

COLOURS = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 70, 235),
    "yellow": (240, 220, 20), "magenta": (220, 40, 220), "cyan": (30, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "star")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
HELD_OUT_PAIRS = (("yellow", "star"), ("cyan", "triangle"), ("magenta", "square"), ("green", "circle"))
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 8

# Images / videos per split (train, val, test) for each part, by size. Training images and videos are asked
# about every object they hold; evaluation ones about one object (plus one query-swap control each).
# Conversations: "conversation" images are asked three questions each (colour, shape, count), and the first
# "conversation_video" temporal videos of a split a few (count, order of appearance, directions).
SIZES = {
    "small": {"region": (6, 4, 4), "temporal": (5, 3, 3), "mask_video": (4, 2, 2), "conversation": (8, 4, 4),
              "conversation_video": (5, 3, 3)},
    "default": {"region": (700, 60, 500), "temporal": (320, 40, 500), "mask_video": (260, 40, 200),
                "conversation": (2400, 40, 300), "conversation_video": (320, 20, 150)},
}
IMAGE_SIZE = 128
OBJECT_SIZE_RANGE = (0.24, 0.36)  # side / diameter as a fraction of the image
MIN_VISIBLE_FRACTION = 0.6        # an object may be hidden by others, never by more than 40 %
VIDEO_SECONDS, VIDEO_FPS = 16.0, 2.0
WINDOW_SECONDS_RANGE = (3.0, 8.0)  # how long a shape of a temporal video is visible
MASK_VIDEO_FRAMES, MASK_VIDEO_FPS = 8, 2.0
SWAP_MAX_IOU = 0.3                 # a query-swap object's answer overlaps the target's this little at most
# Video conversations ask only what frames sampled every 2 s show (8 frames of a 16 s video, the default model's),
# whatever their phase: the first shape appears 4 s before any other, the asked one travels >= 16 px between frames.
VIDEO_QUESTION_FRAME_SECONDS = 2.0
ORDER_GAP_SECONDS = 2 * VIDEO_QUESTION_FRAME_SECONDS
DIRECTION_MIN_PIXELS = 16.0
MCQ_INSTRUCTION = "Answer with the option and its letter."


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    return ys, xs


def shape_mask(shape: str, center_x: float, center_y: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Bool (image_size, image_size) mask of a shape of the given size (side / diameter) in pixels."""
    ys, xs = _pixel_centres(image_size)
    dx, dy, r = xs - center_x, ys - center_y, size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # pointing up, base at the bottom
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "star":
        angle = np.arctan2(dy, dx)
        radius = np.sqrt(dx * dx + dy * dy)
        return radius <= r * (0.55 + 0.45 * np.abs(np.cos(2.5 * angle)))
    raise ValueError(f"Unknown shape {shape!r}; shapes are {SHAPES}.")


def textured_background(rng, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Grey stripes and noise (low saturation, so that the palette's colours stand out)."""
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    base = rng.uniform(70, 170)
    angle = rng.uniform(0, math.pi)
    frequency = rng.uniform(0.05, 0.2)
    stripes = 18 * np.sin(frequency * (xs * math.cos(angle) + ys * math.sin(angle)))
    grey = base + stripes + rng.normal(0, 6, (image_size, image_size))
    tint = rng.uniform(-8, 8, 3)
    image = grey[..., None] + tint
    return np.clip(image, 0, 255).astype(np.uint8)


@dataclass
class Sprite:
    colour: str
    shape: str
    size: float
    x: float
    y: float
    direction: str = "right"
    speed: float = 0.0  # pixels per second
    depth: int = 0      # painting order: a higher depth is painted later (in front)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape

    def position(self, seconds: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        limit = self.size / 2 + 1
        x = float(np.clip(self.x + dx * self.speed * seconds, limit, IMAGE_SIZE - limit))
        y = float(np.clip(self.y + dy * self.speed * seconds, limit, IMAGE_SIZE - limit))
        return x, y

    def mask(self, seconds: float = 0.0) -> np.ndarray:
        return shape_mask(self.shape, *self.position(seconds), self.size)


def visible_masks(full_masks: list[np.ndarray], depths: list[int]) -> list[np.ndarray]:
    """Each object's visible pixels when the objects are painted in the order of `depths` (later in front)."""
    visible = []
    for index, mask in enumerate(full_masks):
        in_front = [full_masks[j] for j in range(len(full_masks)) if depths[j] > depths[index]]
        visible.append(mask & ~np.logical_or.reduce(in_front) if in_front else mask.copy())
    return visible


def paint(image: np.ndarray, sprites: list[Sprite], masks: list[np.ndarray]) -> None:
    """Paint each sprite's (full) mask in depth order, later ones in front."""
    for index in sorted(range(len(sprites)), key=lambda i: sprites[i].depth):
        image[masks[index]] = COLOURS[sprites[index].colour]


def _room_pixels(direction: str, x: float, y: float, size: float) -> float:
    """How far a sprite can move in `direction` before `Sprite.position` stops it at the border."""
    dx, dy = DIRECTIONS[direction]
    limit = size / 2 + 1
    if dx:
        return (IMAGE_SIZE - limit - x) if dx > 0 else (x - limit)
    return (IMAGE_SIZE - limit - y) if dy > 0 else (y - limit)


def _roomy_direction(direction: str, x: float, y: float, size: float) -> str:
    """The drawn direction, or its opposite when the border is nearer that way: a sprite that started
    against the border would not move, and "which direction does it move" would have no answer."""
    if _room_pixels(direction, x, y, size) < _room_pixels(OPPOSITE[direction], x, y, size):
        return OPPOSITE[direction]
    return direction


def _keep_moving(sprite: Sprite, seconds: float) -> None:
    """Cap the speed so that the sprite is still moving at `seconds` (never stopped by the border), so
    its direction shows whenever it is visible."""
    sprite.speed = min(sprite.speed, _room_pixels(sprite.direction, sprite.x, sprite.y, sprite.size) / seconds)


def _all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def _rng(seed: int, split: str, part: str, index: int):
    return np.random.default_rng([seed, SPLITS.index(split), sum(map(ord, part)), index])


# --------------------------------------------------------------------------------------------------
# Scenes with distractors
# --------------------------------------------------------------------------------------------------
SHARED_ATTRIBUTES = ("colour", "shape")


def scene_pairs(rng, count: int, allowed: list[tuple[str, str]], first: tuple[str, str] | None = None,
                share: tuple[str, ...] = ("shape",)) -> list[tuple[str, str]]:
    """`count` different (colour, shape) pairs whose distractors (those after the first) share the first's
    attributes in `share`. One attribute: every distractor shares it, so the other one names the first (with
    "shape", the colour word decides). Both: one distractor shares the colour and one the shape (in random
    order), so only the two words together name it; any further distractors are random."""
    unknown = set(share) - set(SHARED_ATTRIBUTES)
    if unknown or not share:
        raise ValueError(f"Unknown shared attribute(s) {sorted(unknown) or share}; use some of {SHARED_ATTRIBUTES}.")
    pairs = [first if first is not None else allowed[int(rng.integers(len(allowed)))]]
    colour, shape = pairs[0]
    pools = {"colour": [p for p in allowed if p[0] == colour and p[1] != shape],
             "shape": [p for p in allowed if p[1] == shape and p[0] != colour]}
    order = [share[int(i)] for i in rng.permutation(len(share))]
    sharing = order if len(order) > 1 else order * (count - 1)
    for attribute in sharing[: count - 1]:
        pool = [p for p in pools[attribute] if p not in pairs]
        if pool:
            pairs.append(pool[int(rng.integers(len(pool)))])
    rest = [p for p in allowed if p not in pairs]
    for index in rng.permutation(len(rest))[: count - len(pairs)]:
        pairs.append(rest[int(index)])
    return pairs


def _object_count(rng) -> int:
    """2 (a quarter), 3 (half) or 4 (a quarter) objects."""
    return int(rng.choice([2, 3, 3, 4]))


def _random_sprite(rng, pair: tuple[str, str], moving: bool) -> Sprite:
    size = float(rng.uniform(*OBJECT_SIZE_RANGE) * IMAGE_SIZE)
    margin = size / 2 + 2
    x, y = (float(v) for v in rng.uniform(margin, IMAGE_SIZE - margin, 2))
    direction = _roomy_direction(list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))], x, y, size)
    return Sprite(pair[0], pair[1], size, x, y, direction, float(rng.uniform(3, 6)) if moving else 0.0)


def _well_visible(sprites: list[Sprite], times_seconds: list[float]) -> bool:
    """Every sprite keeps `MIN_VISIBLE_FRACTION` of its area visible at every given time."""
    depths = [s.depth for s in sprites]
    for seconds in times_seconds:
        full = [s.mask(seconds) for s in sprites]
        for mask, shown in zip(full, visible_masks(full, depths)):
            if shown.sum() < MIN_VISIBLE_FRACTION * mask.sum():
                return False
    return True


def place_scene(rng, pairs: list[tuple[str, str]], moving: bool = False, times_seconds: tuple[float, ...] = (0.0,),
                speed_scale: float = 1.0) -> list[Sprite]:
    """Sprites for `pairs` at random places and sizes, painted in a random order, each well visible at
    every time in `times_seconds`. After 60 failed draws the last pair is dropped (never below two)."""
    pairs = list(pairs)
    while True:
        for _ in range(60):
            sprites = [_random_sprite(rng, pair, moving) for pair in pairs]
            for depth, sprite in zip(rng.permutation(len(sprites)), sprites):
                sprite.depth = int(depth)
                sprite.speed *= speed_scale
                if moving and max(times_seconds) > 0:
                    _keep_moving(sprite, max(times_seconds))
            if _well_visible(sprites, list(times_seconds)):
                return sprites
        if len(pairs) <= 2:
            raise RuntimeError("No placement keeps two objects visible; the object sizes are too large.")
        pairs.pop()


def _box_xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _box_iou_xywh(a: list[float], b: list[float]) -> float:
    ax0, ay0, ax1, ay1 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx0, by0, bx1, by1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _windows_iou(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """IoU of two sets of windows on the time axis (seconds)."""
    grid = np.arange(0.0, VIDEO_SECONDS, 0.05) + 0.025
    in_a = np.logical_or.reduce([(grid >= s) & (grid < e) for s, e in a])
    in_b = np.logical_or.reduce([(grid >= s) & (grid < e) for s, e in b])
    return float((in_a & in_b).sum() / max((in_a | in_b).sum(), 1))


def swap_partner(rng, count: int, overlap) -> int | None:
    """The query-swap object of a scene whose target is object 0: a random other object whose answer overlaps
    the target's at most `SWAP_MAX_IOU` (`overlap(0, j)`), or None when none qualifies."""
    others = [j for j in rng.permutation(count).tolist() if j != 0 and overlap(0, j) <= SWAP_MAX_IOU]
    return others[0] if others else None


# --------------------------------------------------------------------------------------------------
# Temporal videos
# --------------------------------------------------------------------------------------------------
def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=int(fps))
    stream.width, stream.height, stream.pix_fmt = IMAGE_SIZE, IMAGE_SIZE, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "18", "g": str(int(fps) * 2), "threads": "1"}
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _visibility_window(rng) -> tuple[float, float]:
    """One window of 3-8 s on 1/fps boundaries."""
    steps = int(VIDEO_SECONDS * VIDEO_FPS)
    length = int(round(rng.uniform(*WINDOW_SECONDS_RANGE) * VIDEO_FPS))
    start = int(rng.integers(0, steps - length + 1))
    return start / VIDEO_FPS, (start + length) / VIDEO_FPS


MAX_TOTAL_SHOWN_SECONDS = VIDEO_SECONDS + 2.0  # the shapes' windows together: neighbours overlap by a second at most


def _distinct_windows(rng, count: int) -> list[list[tuple[float, float]]]:
    """One window per shape, one after another in a random order: lengths of 3-8 s (shrunk to fit when together
    they are longer than `MAX_TOTAL_SHOWN_SECONDS`), random gaps, neighbours overlapping by at most a second, on
    1/fps boundaries; so each shape has its own answer, and neither order nor length tells the target."""
    step = 1 / VIDEO_FPS
    lengths = rng.uniform(*WINDOW_SECONDS_RANGE, count)
    lengths *= min(1.0, MAX_TOTAL_SHOWN_SECONDS / lengths.sum())
    lengths = np.maximum(np.round(lengths / step) * step, 2 * step)
    free = VIDEO_SECONDS - lengths.sum()
    if free >= 0:  # random gaps before, between and after the windows
        gaps = np.floor(rng.dirichlet(np.ones(count + 1)) * free / step) * step
        starts = np.cumsum(np.concatenate([[gaps[0]], lengths[:-1] + gaps[1:-1]]))
    else:  # neighbours share the excess equally
        overlap = np.ceil(-free / max(count - 1, 1) / step) * step
        starts = np.concatenate([[0.0], np.cumsum(lengths[:-1] - overlap)])
    order = rng.permutation(count)
    return [[(float(starts[k]), float(min(starts[k] + lengths[k], VIDEO_SECONDS)))] for k in order]


def _clip_saliency(windows: list[tuple[float, float]]) -> tuple[list[int], list[list[int]]]:
    """Relevant 2-second clips and three annotators' 0-4 scores from the visible fraction of each clip."""
    clip_ids, scores = [], []
    for clip in range(int(VIDEO_SECONDS // 2)):
        start, end = clip * 2.0, clip * 2.0 + 2.0
        visible = sum(max(0.0, min(end, e) - max(start, s)) for s, e in windows) / 2.0
        if visible <= 0:
            continue
        base = 4 * visible
        clip_ids.append(clip)
        scores.append([int(np.clip(round(base + offset), 1, 4)) for offset in (0.0, -0.6, 0.4)])
    return clip_ids, scores


def _frame_times() -> list[float]:
    return [index / VIDEO_FPS for index in range(int(VIDEO_SECONDS * VIDEO_FPS))]


def make_temporal_video(rng, path: Path, allowed_pairs: list[tuple[str, str]] | None = None,
                        share: tuple[str, ...] = ("shape",)) -> dict:
    """A 16 s video of 2-4 shapes, each visible during its own window of 3-8 s (windows of different
    shapes overlap little: IoU at most 1/3); the shapes move, are painted in a random order and share colours or shapes.
    Returns {"sprites", "windows" (per sprite), "appearances" (first visible second per name)}."""
    pairs = scene_pairs(rng, _object_count(rng), allowed_pairs or _all_pairs(), share=share)
    windows = _distinct_windows(rng, len(pairs))
    times = _frame_times()
    sprites = place_scene(rng, pairs, moving=True, times_seconds=(0.0, VIDEO_SECONDS / 2, VIDEO_SECONDS))
    windows = windows[: len(sprites)]
    background = textured_background(rng)
    frames, appearances = [], {}
    for seconds in times:
        image = background.copy()
        present = [i for i, w in enumerate(windows) if any(s <= seconds < e for s, e in w)]
        paint(image, [sprites[i] for i in present], [sprites[i].mask(seconds) for i in present])
        for i in present:
            appearances.setdefault(sprites[i].name, seconds)
        frames.append(image)
    _write_video(path, frames, VIDEO_FPS)
    return {"sprites": sprites, "windows": windows, "appearances": appearances}


def _temporal_job(args: tuple) -> dict:
    """One video (a separate process may run it): (seed, split, index, path, allowed pairs, shared attributes)."""
    seed, split, index, path, allowed, share = args
    return make_temporal_video(_rng(seed, split, "temporal", index), Path(path), allowed, share)


# --------------------------------------------------------------------------------------------------
# Records in the real formats
# --------------------------------------------------------------------------------------------------
def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def _round(values, digits: int = 3):
    return [round(float(v), digits) for v in values]


def _qvh_record(qid: str, video_id: str, sprite: Sprite, windows, all_windows) -> dict:
    clip_ids, scores = _clip_saliency(windows)
    return {"qid": qid, "query": sprite.name, "duration": VIDEO_SECONDS, "vid": video_id,
            "relevant_windows": [_round(w) for w in windows], "relevant_clip_ids": clip_ids,
            "saliency_scores": scores,
            # every shape's windows (the target's among them): the question-blind floor's alternatives
            "alternative_windows": [[_round(w) for w in ws] for ws in all_windows]}


def _generate_temporal(root: Path, split: str, count: int, seed: int, videos: dict, workers: int,
                       share: tuple[str, ...]) -> dict[str, Path]:
    video_dir = root / "temporal" / "videos"
    jobs = [(seed, split, index, str(video_dir / f"{split}_{index:05d}.mp4"), None, share) for index in range(count)]
    if workers > 1 and count > 8:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            infos = list(pool.map(_temporal_job, jobs, chunksize=8))
    else:
        infos = [_temporal_job(job) for job in jobs]
    lines, swaps = [], []
    for index, info in enumerate(infos):
        video_id = f"{split}_{index:05d}"
        videos[video_id] = info
        sprites, windows = info["sprites"], info["windows"]
        if split == "train":  # every shape is asked about
            lines += [_qvh_record(f"{split}-{index}-{k}", video_id, s, w, windows) for k, (s, w) in
                      enumerate(zip(sprites, windows))]
            continue
        # The target is object 0, whose colour and shape the others share (its depth, size, place and window are
        # random, so nothing but the question singles it out).
        swap = swap_partner(_rng(seed, split, "temporal-query", index), len(sprites),
                            lambda i, j: _windows_iou(windows[i], windows[j]))
        lines.append(_qvh_record(f"{split}-{index}", video_id, sprites[0], windows[0], windows))
        if swap is not None:
            swaps.append(_qvh_record(f"{split}_swap-{index}", video_id, sprites[swap], windows[swap], windows))
    paths = {}
    for name, records in ((split, lines), (f"{split}_swap", swaps)):
        if records:
            paths[name] = root / "temporal" / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    return paths


def make_region_image(rng, allowed_pairs: list[tuple[str, str]], share: tuple[str, ...] = ("shape",)
                      ) -> tuple[np.ndarray, list[Sprite], list[np.ndarray]]:
    """An image of 2-4 objects sharing the first's attributes in `share`, in random depth; each object's
    visible mask."""
    sprites = place_scene(rng, scene_pairs(rng, _object_count(rng), allowed_pairs, share=share))
    image = textured_background(rng)
    full = [s.mask() for s in sprites]
    paint(image, sprites, full)
    return image, sprites, visible_masks(full, [s.depth for s in sprites])


def _generate_refcoco(root: Path, count: dict, seed: int, share: tuple[str, ...]) -> dict:
    images, annotations, refs = [], [], []
    for split in SPLITS:
        for index in range(count[split]):
            rng = _rng(seed, split, "region", index)
            image, sprites, masks = make_region_image(rng, _all_pairs(), share)
            image_id = len(images) + 1
            file_name = f"{split}_{index:05d}.png"
            (root / "refcoco" / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "refcoco" / "images" / file_name, optimize=False)
            images.append({"id": image_id, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
            annotation_ids = []
            for sprite, mask in zip(sprites, masks):
                annotation_ids.append(len(annotations) + 1)
                annotations.append({
                    "id": annotation_ids[-1], "image_id": image_id, "category_id": SHAPES.index(sprite.shape) + 1,
                    "bbox": _box_xywh(mask), "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle_from_mask(mask),
                })
            if split == "train":  # every object is asked about
                asked = [(i, split) for i in range(len(sprites))]
            else:  # the target (object 0, see _generate_temporal), and a query-swap control on the same image
                boxes = [annotations[a - 1]["bbox"] for a in annotation_ids]
                swap = swap_partner(_rng(seed, split, "region-query", index), len(sprites),
                                    lambda i, j: _box_iou_xywh(boxes[i], boxes[j]))
                asked = [(0, split)] + ([(swap, f"{split}_swap")] if swap is not None else [])
            for object_index, ref_split in asked:
                sprite = sprites[object_index]
                refs.append({"ref_id": len(refs) + 1, "ann_id": annotation_ids[object_index], "image_id": image_id,
                             "split": ref_split, "category_id": SHAPES.index(sprite.shape) + 1,
                             "sentences": [{"sent": sprite.name, "raw": sprite.name}]})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}
    _dump(root / "refcoco" / "instances.json", instances)
    _dump(root / "refcoco" / "refs.json", refs)
    return {"instances": "refcoco/instances.json", "refs": "refcoco/refs.json", "image_dir": "refcoco/images"}


def _mask_video_sprites(rng, share: tuple[str, ...]) -> list[Sprite]:
    """Half of the videos: twins (same colour and shape) moving in opposite directions, told apart only by
    the motion, plus up to one distractor; the others: 2-3 objects that share the attributes in `share`."""
    seconds = (MASK_VIDEO_FRAMES - 1) / MASK_VIDEO_FPS
    times = tuple(i / MASK_VIDEO_FPS for i in range(MASK_VIDEO_FRAMES))
    if rng.random() < 0.5:
        pairs = scene_pairs(rng, int(rng.integers(2, 4)), _all_pairs(), share=share)
        return place_scene(rng, pairs, moving=True, times_seconds=times, speed_scale=4.0)
    twin = _all_pairs()[int(rng.integers(len(_all_pairs())))]
    extra = scene_pairs(rng, 2, _all_pairs(), first=twin, share=share)[1:] if rng.random() < 0.5 else []
    axis = ("left", "right") if rng.random() < 0.5 else ("up", "down")
    for _ in range(200):
        sprites = place_scene(rng, [twin, twin] + extra, moving=True, times_seconds=(0.0,), speed_scale=4.0)
        if len(sprites) < 2:
            continue
        for sprite, direction in zip(sprites[:2], axis):
            sprite.direction = direction
            sprite.speed = float(rng.uniform(12, 24))
            _keep_moving(sprite, seconds)
        moved = all(s.speed * seconds >= 10 for s in sprites[:2])
        if moved and _well_visible(sprites, list(times)):
            return sprites
    raise RuntimeError("No placement of moving twins keeps them visible.")


def _generate_mevis(root: Path, split: str, count: int, seed: int, share: tuple[str, ...]) -> dict:
    meta, mask_dict = {"videos": {}}, {}
    for index in range(count):
        rng = _rng(seed, split, "mask_video", index)
        sprites = _mask_video_sprites(rng, share)
        background = textured_background(rng)
        video_id = f"{split}_{index:05d}"
        frame_dir = root / "mevis" / "JPEGImages" / video_id
        frame_dir.mkdir(parents=True, exist_ok=True)
        frames, per_object = [], [[] for _ in sprites]
        for frame_index in range(MASK_VIDEO_FRAMES):
            seconds = frame_index / MASK_VIDEO_FPS
            image = background.copy()
            full = [s.mask(seconds) for s in sprites]
            paint(image, sprites, full)
            for masks, mask in zip(per_object, visible_masks(full, [s.depth for s in sprites])):
                masks.append(mask)
            Image.fromarray(image).save(frame_dir / f"{frame_index:05d}.jpg", quality=95)
            frames.append(f"{frame_index:05d}")
        expressions = {}
        for sprite, masks in zip(sprites, per_object):  # every object is annotated and asked about
            annotation_id = str(len(mask_dict))
            mask_dict[annotation_id] = [rle_from_mask(m) for m in masks]
            expressions[str(len(expressions))] = {"exp": f"{sprite.name} moving {sprite.direction}",
                                                  "anno_id": [annotation_id], "obj_id": [len(expressions)]}
        meta["videos"][video_id] = {"frames": frames, "expressions": expressions}
    _dump(root / "mevis" / split / "meta_expressions.json", meta)
    _dump(root / "mevis" / split / "mask_dict.json", mask_dict)
    return {"meta_expressions": f"mevis/{split}/meta_expressions.json", "mask_dict": f"mevis/{split}/mask_dict.json",
            "frames_dir": "mevis/JPEGImages", "fps": MASK_VIDEO_FPS}


# --------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------
def _options(rng, correct: str, pool: list[str]) -> tuple[list[str], str]:
    others = [p for p in pool if p != correct]
    chosen = [correct] + [others[i] for i in rng.permutation(len(others))[:3]]
    order = rng.permutation(len(chosen))
    options = [chosen[i] for i in order]
    return options, "ABCD"[options.index(correct)]


def _mcq_text(question: str, options: list[str]) -> str:
    lines = [question] + [f"{letter}. {option}" for letter, option in zip("ABCD", options)]
    return "\n".join(lines + [MCQ_INSTRUCTION])


def mcq_reply(option: str, letter: str) -> str:
    """The reference reply to a multiple-choice question: the option's text, then its letter ("red (B)").

    Naming the answer first gives a small LM the step a bare letter lacks: its next token then only has to find
    that text among the options and copy the letter before it (an induction-style lookup); a bare letter needs
    the visual answer and the lookup in one forward pass. The letter is what `mcqa_accuracy` scores."""
    return f"{option} ({letter})"


def _distinct_pairs(rng, count: int, allowed: list[tuple[str, str]], first: tuple[str, str] | None = None):
    """`count` pairs with different colours and different shapes (so that a colour or a shape names one)."""
    pairs = [first] if first is not None else []
    for index in rng.permutation(len(allowed)).tolist():
        colour, shape = allowed[index]
        if len(pairs) == count:
            break
        if all(colour != c and shape != s for c, s in pairs):
            pairs.append((colour, shape))
    return pairs


def _conversations_on_image(rng, split: str, index: int, root: Path) -> list[dict]:
    """One image of 1-4 objects of different colours and shapes, asked its target's colour, its target's shape
    and how many objects it shows (three conversations). Training images never show a held-out colour x shape
    pair; every other test image has one as its target."""
    allowed = [p for p in _all_pairs() if p not in HELD_OUT_PAIRS] if split == "train" else _all_pairs()
    first = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))] if split == "test" and index % 2 == 0 else None
    sprites = place_scene(rng, _distinct_pairs(rng, int(rng.integers(1, 5)), allowed, first))
    image = textured_background(rng)
    paint(image, sprites, [s.mask() for s in sprites])
    file_name = f"{split}_{index:05d}.png"
    (root / "conversation" / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "conversation" / "images" / file_name)
    target, media = sprites[0], {"image": f"images/{file_name}"}
    questions = {
        "colour": (f"What colour is the {target.shape}?", target.colour, list(COLOURS)),
        "shape": (f"What shape is the {target.colour} object?", target.shape, list(SHAPES)),
        "count": ("How many shapes are in the image?", NUMBER_WORDS[len(sprites)], list(NUMBER_WORDS[1:])),
    }
    return [_conversation_record(rng, f"img-{split}-{index}-{kind}", media, question, answer, pool, kind, target.name,
                                 multiple_choice=(index + k) % 2 == 0)
            for k, (kind, (question, answer, pool)) in enumerate(questions.items())]


def _visible_travel_pixels(sprite: Sprite, windows: list[tuple[float, float]]) -> float:
    """How far a sprite moves between the first and last of the frames that any uniform sampling every
    `VIDEO_QUESTION_FRAME_SECONDS` shows of each visibility window (the worst phase), at most over its windows."""
    spacing = VIDEO_QUESTION_FRAME_SECONDS
    return max(sprite.speed * spacing * max(0, math.floor((e - s) / spacing) - 1) for s, e in windows)


def _conversations_on_video(rng, split: str, index: int, video_id: str, info: dict) -> list[dict]:
    """Questions on a temporal video whose answers the sampled frames show: how many shapes appear; which shape
    appears first (last), when it appears `ORDER_GAP_SECONDS` before (after) any other, so that frames sampled
    uniformly every `VIDEO_QUESTION_FRAME_SECONDS` show the order whatever their phase; the direction of each
    shape that travels at least `DIRECTION_MIN_PIXELS` between such frames."""
    sprites, windows = info["sprites"], info["windows"]
    media = {"video": f"../temporal/videos/{video_id}.mp4"}
    questions = [("count", "How many shapes appear in the video?", NUMBER_WORDS[len(sprites)],
                  list(NUMBER_WORDS[1:]), sprites[0])]
    appearances = sorted(info["appearances"].items(), key=lambda item: item[1])
    # Objects are named by colour and shape: the shapes of a video may all be alike (the default `share`).
    pool = list(dict.fromkeys([s.name for s in sprites] + [" ".join(p) for p in _all_pairs()]))
    for word, first, second in (("first", 0, 1), ("last", -1, -2)):
        if len(appearances) >= 2 and abs(appearances[second][1] - appearances[first][1]) >= ORDER_GAP_SECONDS:
            subject = next(s for s in sprites if s.name == appearances[first][0])
            questions.append(("order", f"Which object appears {word} in the video?", subject.name, pool, subject))
    for sprite, sprite_windows in zip(sprites, windows):
        if _visible_travel_pixels(sprite, sprite_windows) >= DIRECTION_MIN_PIXELS:
            questions.append(("direction", f"In which direction does the {sprite.name} move?", sprite.direction,
                              list(DIRECTIONS), sprite))
    return [_conversation_record(rng, f"vid-{split}-{index}-{k}-{kind}", media, question, answer, pool, kind,
                                 subject.name, multiple_choice=(index + k) % 2 == 1)
            for k, (kind, question, answer, pool, subject) in enumerate(questions)]


def _conversation_record(rng, record_id: str, media: dict, question: str, answer: str, pool: list[str], kind: str,
                         subject: str, multiple_choice: bool) -> dict:
    placeholder = "<image>" if "image" in media else "<video>"
    # `held_out`: the subject is a colour x shape pair that no training conversation shows.
    common = {"id": record_id, **media, "category": kind, "subject": subject,
              "held_out": tuple(subject.split()) in HELD_OUT_PAIRS}
    if multiple_choice:
        options, letter = _options(rng, answer, pool)
        return {**common, "options": options, "answer": letter,
                "conversations": [{"from": "human", "value": f"{placeholder}\n{_mcq_text(question, options)}"},
                                  {"from": "gpt", "value": mcq_reply(answer, letter)}]}
    return {**common, "conversations": [{"from": "human", "value": f"{placeholder}\n{question} Answer with one word."},
                                        {"from": "gpt", "value": answer}]}


def multi_turn(rng, records: list[dict]) -> dict:
    """The questions of one image or video (single-question records) as one conversation of several turns, in a
    random order: one sample supervises every answer, for the price of one image or video in the model. The
    record keeps the categories (`categories`) and the subject of its first question."""
    order = rng.permutation(len(records)).tolist()
    turns = []
    for position, index in enumerate(order):
        question, reply = records[index]["conversations"]
        value = question["value"] if position == 0 else question["value"].split("\n", 1)[1]  # one placeholder
        turns += [{**question, "value": value}, reply]
    first = records[order[0]]
    media = {key: first[key] for key in ("image", "video") if key in first}
    return {"id": first["id"].rsplit("-", 1)[0], **media, "category": "multi_turn",
            "categories": [records[i]["category"] for i in order], "subject": first["subject"],
            "held_out": any(r["held_out"] for r in records), "conversations": turns}


def _generate_conversations(root: Path, split: str, image_count: int, video_count: int, seed: int,
                            videos: dict) -> str:
    """Three questions per image (`image_count` images) and a few per temporal video (the first `video_count`
    videos of the split; for training, of those that show no held-out pair); half of them (alternately)
    multiple-choice. Evaluation splits hold one question per record (each scored on its own), the training
    split one multi-turn conversation per image or video (`multi_turn`)."""
    per_media = []
    for index in range(image_count):
        per_media.append(_conversations_on_image(_rng(seed, split, "conversation", index), split, index, root))
    video_ids = sorted(v for v in videos if v.startswith(split))
    if split == "train":  # training conversations never show a held-out pair, in images or in videos
        video_ids = [v for v in video_ids if not any(s.pair in HELD_OUT_PAIRS for s in videos[v]["sprites"])]
    for index, video_id in enumerate(video_ids[:video_count]):
        per_media.append(_conversations_on_video(_rng(seed, split, "conversation-video", index), split, index,
                                                 video_id, videos[video_id]))
    if split == "train":
        records = [multi_turn(_rng(seed, split, "conversation-turns", index), group)
                   for index, group in enumerate(per_media)]
    else:
        records = [record for group in per_media for record in group]
    _dump(root / "conversation" / f"{split}.json", records)
    return f"conversation/{split}.json"


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
PART_FOLDERS = ("temporal", "refcoco", "mevis", "conversation")
_PATH_KEYS = ("jsonl", "json", "video_dir", "instances", "refs", "image_dir", "meta_expressions", "mask_dict",
              "frames_dir", "media_dir")
_FILE_KEYS = ("jsonl", "json", "instances", "refs", "meta_expressions", "mask_dict")


def resolve_manifest(manifest: dict, folder: str | os.PathLike) -> dict:
    """The manifest with every path in its specs joined to `folder` (the manifest's own folder), so that it
    reads from any working directory. Absolute paths stay as they are."""
    resolved = json.loads(json.dumps(manifest))
    for group in ("splits", "controls"):
        for parts in resolved.get(group, {}).values():
            for spec in parts.values():
                for key in _PATH_KEYS:
                    if key in spec:
                        spec[key] = str(Path(folder) / spec[key])
    resolved["root"] = str(Path(folder))
    return resolved


def load_manifest(path: str | os.PathLike) -> dict:
    """A benchmark's manifest (the file, or its folder) with paths resolved against its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    return resolve_manifest(json.loads(path.read_text(encoding="utf-8")), path.parent)


def _is_complete(manifest: dict, size: str, seed: int, share: tuple[str, ...]) -> bool:
    """Same size, seed, shared attributes and format version, and every annotation file still there."""
    if (manifest.get("size"), manifest.get("seed"), manifest.get("version")) != (size, seed, FORMAT_VERSION):
        return False
    if tuple(manifest.get("share", ())) != tuple(share):
        return False
    files = [value for group in ("splits", "controls") for parts in manifest.get(group, {}).values()
             for spec in parts.values() for key, value in spec.items() if key in _FILE_KEYS]
    return all(Path(f).exists() for f in files)


def generate_synthetic_benchmark(out_dir: str | os.PathLike, size: str = "default", seed: int = 0,
                                 workers: int | None = None, share: tuple[str, ...] | list[str] = ("shape",)) -> dict:
    """Write the benchmark under `out_dir` and return its manifest, paths resolved (`out_dir/manifest.json`
    holds them relative to `out_dir`, so the folder can move).

    A folder that already holds a complete benchmark of the same size, seed and format version is reused
    as it is. Otherwise the generator's own folders (temporal/, refcoco/, mevis/, conversation/) are
    replaced; other files in `out_dir` are left alone. `workers`: processes for the videos (default: the
    CPU count); the files do not depend on it. `share`: what the distractors share with the target (see
    `scene_pairs`): ("shape",), the default, makes the colour word decide; ("colour", "shape") needs both
    words, so also the shape, which the tiny from-scratch default model does not learn to see in minutes
    (see the README).
    """
    share = tuple(share)
    scene_pairs(np.random.default_rng(0), 2, _all_pairs(), share=share)  # refuse an unknown attribute early
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {list(SIZES)}.")
    root = Path(out_dir)
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest = load_manifest(manifest_path)
        if _is_complete(manifest, size, seed, share):
            logger.info("Reusing the synthetic benchmark in %s", root)
            return manifest
    # The manifest goes first and comes back last: a run cut short never looks complete. Only the
    # folders this generator writes are removed, never anything else in `out_dir`.
    manifest_path.unlink(missing_ok=True)
    for part in PART_FOLDERS:
        shutil.rmtree(root / part, ignore_errors=True)
    counts = {part: dict(zip(SPLITS, numbers)) for part, numbers in SIZES[size].items()}
    root.mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 4)
    logger.info("Generating the synthetic benchmark (%s, seed %d) in %s", size, seed, root)
    videos: dict = {}
    splits = {split: {} for split in SPLITS}
    controls = {split: {} for split in SPLITS if split != "train"}
    video_dir = "temporal/videos"
    for split in SPLITS:
        paths = _generate_temporal(root, split, counts["temporal"][split], seed, videos, workers, share)
        splits[split]["temporal"] = {"format": "qvhighlights", "split": split,
                                     "jsonl": str(paths[split].relative_to(root)), "video_dir": video_dir}
        if f"{split}_swap" in paths:
            controls[split]["temporal_query_swap"] = {"format": "qvhighlights", "split": split,
                                                      "jsonl": str(paths[f"{split}_swap"].relative_to(root)),
                                                      "video_dir": video_dir}
    refcoco = _generate_refcoco(root, counts["region"], seed, share)
    for split in SPLITS:
        evaluation = {"alternatives": True} if split != "train" else {}
        splits[split]["region"] = {"format": "refcoco", **refcoco, "split": split, "tasks": ["region"],
                                   "dataset_name": "synthetic_refcoco", **evaluation}
        # Image masks: the first half of the split's region queries (image masks are cheap to learn).
        splits[split]["mask_image"] = {"format": "refcoco", **refcoco, "split": split, "tasks": ["mask"],
                                       "dataset_name": "synthetic_refcoco", **evaluation,
                                       "max_samples": max(1, counts["region"][split] // 2)}
        splits[split]["mask_video"] = {"format": "mevis", "split": split, "dataset_name": "synthetic_mevis",
                                       **_generate_mevis(root, split, counts["mask_video"][split], seed, share),
                                       **evaluation}
        splits[split]["conversation"] = {"format": "llava", "media_dir": "conversation", "split": split,
                                         "fps": VIDEO_FPS,
                                         "json": _generate_conversations(root, split, counts["conversation"][split],
                                                                         counts["conversation_video"][split], seed,
                                                                         videos)}
        if split != "train":
            controls[split]["region_query_swap"] = {"format": "refcoco", **refcoco, "split": f"{split}_swap",
                                                    "tasks": ["region"], "dataset_name": "synthetic_refcoco"}
            # the same swapped queries answered with masks, as many as the split's image-mask queries
            controls[split]["mask_query_swap"] = {"format": "refcoco", **refcoco, "split": f"{split}_swap",
                                                  "tasks": ["mask"], "dataset_name": "synthetic_refcoco",
                                                  "max_samples": max(1, counts["region"][split] // 2)}
    manifest = {"version": FORMAT_VERSION, "size": size, "seed": seed, "share": list(share), "splits": splits,
                "controls": controls,
                "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS]}
    _dump(manifest_path, manifest)
    return resolve_manifest(manifest, root)


def load_split(manifest: dict, split: str,
               parts: tuple[str, ...] = ("temporal", "region", "mask_image", "mask_video", "conversation")):
    """The schema datasets of one split, one per part, read with the real readers."""
    from .readers import read_spec

    return {part: read_spec(manifest["splits"][split][part]) for part in parts}


def load_controls(manifest: dict, split: str) -> dict:
    """The query-swap control datasets of an evaluation split ({} for train), read with the real readers."""
    from .readers import read_spec

    return {name: read_spec(spec) for name, spec in manifest.get("controls", {}).get(split, {}).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", default="default", choices=list(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes for the videos (default: CPU count)")
    parser.add_argument("--share", nargs="+", default=["shape"], choices=SHARED_ATTRIBUTES,
                        help="what distractors share with the target (default: shape, so the colour word decides)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = generate_synthetic_benchmark(args.out, size=args.size, seed=args.seed, workers=args.workers,
                                            share=args.share)
    logger.info("Wrote %s", Path(args.out) / "manifest.json")
    for split, parts in manifest["splits"].items():
        logger.info("%s: %s", split, ", ".join(parts))


if __name__ == "__main__":
    main()
