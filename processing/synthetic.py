"""The synthetic benchmark: coloured shapes over textured backgrounds, every answer known exactly.

Written as real files in the real formats, so that the real readers load them:
    temporal/      QVHighlights-style jsonl per split + mp4 videos (PyAV, H.264): when is the shape visible
    refcoco/       COCO instances json (boxes xywh, RLE masks) + RefCOCO refs json + PNG images: where / which pixels
    mevis/         MeViS-style meta_expressions.json + mask_dict.json per split + JPEG frame folders: video masks
    conversation/  LLaVA-style json per split: open and multiple-choice questions on images and videos
    manifest.json  every file per split and task

Questions about colour, shape, count, motion direction and order of appearance; colour x shape pairs in
`HELD_OUT_PAIRS` never appear in the training conversations and are the subject of test conversations.
Everything is drawn from a seeded generator per (seed, split, task, index): the same seed gives
byte-identical annotation files.

    python -m tpo.processing.synthetic --out DIR [--size small|default] [--seed 0]
"""

import argparse
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
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
HELD_OUT_PAIRS = (("yellow", "star"), ("cyan", "triangle"), ("magenta", "square"), ("green", "circle"))
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 4

# Samples per split for each part, by size.
SIZES = {
    "small": {"region": (6, 3, 3), "temporal": (6, 3, 3), "mask_video": (4, 2, 2), "conversation": (6, 3, 3)},
    "default": {"region": (400, 80, 120), "temporal": (360, 60, 80), "mask_video": (200, 50, 50),
                "conversation": (400, 80, 80)},
}
IMAGE_SIZE = 128
VIDEO_SECONDS, VIDEO_FPS = 16.0, 4.0
MASK_VIDEO_FRAMES, MASK_VIDEO_FPS = 8, 2.0


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------
def shape_mask(shape: str, center_x: float, center_y: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Bool (image_size, image_size) mask of a shape of the given size (side / diameter) in pixels."""
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
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


def textured_background(rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
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

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def position(self, seconds: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        limit = self.size / 2 + 1
        x = float(np.clip(self.x + dx * self.speed * seconds, limit, IMAGE_SIZE - limit))
        y = float(np.clip(self.y + dy * self.speed * seconds, limit, IMAGE_SIZE - limit))
        return x, y


def paint(image: np.ndarray, sprites: list[tuple[Sprite, float, float]]) -> list[np.ndarray]:
    """Paint sprites (sprite, x, y) in order (later on top); returns each sprite's visible mask."""
    masks = []
    for sprite, x, y in sprites:
        mask = shape_mask(sprite.shape, x, y, sprite.size)
        image[mask] = COLOURS[sprite.colour]
        masks = [m & ~mask for m in masks]
        masks.append(mask)
    return masks


def _distinct_sprites(rng, count: int, allowed_pairs: list[tuple[str, str]], moving: bool,
                      first_pair: tuple[str, str] | None = None) -> list[Sprite]:
    """`count` sprites with different colours and different shapes (so a name is unambiguous); the
    first one is `first_pair` when given."""
    sprites, used_colours, used_shapes = [], set(), set()
    for attempt in range(200):
        if len(sprites) == count:
            break
        if attempt == 0 and first_pair is not None:
            colour, shape = first_pair
        else:
            colour, shape = allowed_pairs[rng.integers(len(allowed_pairs))]
        if colour in used_colours or shape in used_shapes:
            continue
        size = float(rng.uniform(0.28, 0.45) * IMAGE_SIZE)
        margin = size / 2 + 2
        x, y = float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin))
        direction = _roomy_direction(list(DIRECTIONS)[rng.integers(len(DIRECTIONS))], x, y, size)
        sprites.append(Sprite(colour, shape, size, x, y, direction, float(rng.uniform(3, 6)) if moving else 0.0))
        used_colours.add(colour)
        used_shapes.add(shape)
    return sprites


def _room_pixels(direction: str, x: float, y: float, size: float) -> float:
    """How far a sprite can move in `direction` before `Sprite.position` stops it at the border."""
    dx, dy = DIRECTIONS[direction]
    limit = size / 2 + 1
    if dx:
        return (IMAGE_SIZE - limit - x) if dx > 0 else (x - limit)
    return (IMAGE_SIZE - limit - y) if dy > 0 else (y - limit)


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _roomy_direction(direction: str, x: float, y: float, size: float) -> str:
    """The drawn direction, or its opposite when the border is nearer that way: a sprite that started
    against the border would not move, and "which direction does it move" would have no answer.
    Flipping needs no random draw, so the rest of the sample is unchanged."""
    if _room_pixels(direction, x, y, size) < _room_pixels(_OPPOSITE[direction], x, y, size):
        return _OPPOSITE[direction]
    return direction


def _keep_moving(sprite: Sprite, seconds: float) -> None:
    """Cap the speed so that the sprite is still moving at `seconds` (never stopped by the border), so
    its direction shows whenever it is visible."""
    sprite.speed = min(sprite.speed, _room_pixels(sprite.direction, sprite.x, sprite.y, sprite.size) / seconds)


def _all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def _rng(seed: int, split: str, part: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), sum(map(ord, part)), index])


# --------------------------------------------------------------------------------------------------
# Parts
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


def _visibility_windows(rng) -> list[tuple[float, float]]:
    """One window (sometimes two) covering about 20-60 % of the video, on 1/fps boundaries."""
    frames = int(VIDEO_SECONDS * VIDEO_FPS)
    two = rng.random() < 0.2
    total = int(rng.uniform(0.2, 0.6) * frames)
    if two:
        first = max(total // 2, 3)
        second = max(total - first, 3)
        start1 = int(rng.integers(0, frames // 2 - first))
        start2 = int(rng.integers(frames // 2 + 1, frames - second))
        windows = [(start1, start1 + first), (start2, start2 + second)]
    else:
        start = int(rng.integers(0, frames - total))
        windows = [(start, start + total)]
    return [(s / VIDEO_FPS, e / VIDEO_FPS) for s, e in windows]


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


def make_temporal_video(rng, path: Path) -> dict:
    """A 16 s video: the target is visible during its window(s) only; 1-2 distractors elsewhere."""
    sprites = _distinct_sprites(rng, int(rng.integers(2, 4)), _all_pairs(), moving=True)
    for sprite in sprites:
        _keep_moving(sprite, VIDEO_SECONDS)
    target, distractors = sprites[0], sprites[1:]
    windows = _visibility_windows(rng)
    distractor_windows = [[(float(a), float(a) + float(rng.uniform(3, 10)))] for a in rng.uniform(0, 10, len(distractors))]
    background = textured_background(rng)
    frames, appearances = [], {}
    for index in range(int(VIDEO_SECONDS * VIDEO_FPS)):
        seconds = index / VIDEO_FPS
        image = background.copy()
        layers = []
        for sprite, sprite_windows in zip(distractors + [target], distractor_windows + [windows]):
            if any(s <= seconds < e for s, e in sprite_windows):
                layers.append((sprite, *sprite.position(seconds)))
                appearances.setdefault(sprite.name, seconds)
        paint(image, layers)
        frames.append(image)
    _write_video(path, frames, VIDEO_FPS)
    clip_ids, scores = _clip_saliency(windows)
    return {"target": target, "sprites": sprites, "windows": windows, "clip_ids": clip_ids, "scores": scores,
            "appearances": appearances}


def make_image(rng, allowed_pairs) -> tuple[np.ndarray, list[Sprite], list[np.ndarray]]:
    sprites = _distinct_sprites(rng, int(rng.integers(1, 4)), allowed_pairs, moving=False)
    image = textured_background(rng)
    masks = paint(image, [(s, s.x, s.y) for s in reversed(sprites)])[::-1]  # sprites[0] painted last (on top)
    return image, sprites, masks


def _without_hidden(sprites: list[Sprite], max_hidden_fraction: float = 0.5) -> list[Sprite]:
    """Leave out (do not draw) a sprite that the sprites in front of it would mostly cover, so that
    "how many shapes" and "what colour is the X" have one answer. sprites[0] is in front of all others."""
    kept, in_front = [], np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for sprite in sprites:
        mask = shape_mask(sprite.shape, sprite.x, sprite.y, sprite.size)
        if (mask & in_front).sum() > max_hidden_fraction * mask.sum():
            continue
        kept.append(sprite)
        in_front |= mask
    return kept


def _box_xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _options(rng, correct: str, pool: list[str]) -> tuple[list[str], str]:
    others = [p for p in pool if p != correct]
    chosen = [correct] + [others[i] for i in rng.permutation(len(others))[:3]]
    order = rng.permutation(len(chosen))
    options = [chosen[i] for i in order]
    return options, "ABCD"[options.index(correct)]


def _mcq_text(question: str, options: list[str]) -> str:
    lines = [question] + [f"{letter}. {option}" for letter, option in zip("ABCD", options)]
    return "\n".join(lines + ["Answer with the option's letter."])


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def _round(values, digits: int = 3):
    return [round(float(v), digits) for v in values]


def _generate_temporal(root: Path, split: str, count: int, seed: int, videos: dict) -> Path:
    lines = []
    for index in range(count):
        rng = _rng(seed, split, "temporal", index)
        video_id = f"{split}_{index:05d}"
        info = make_temporal_video(rng, root / "temporal" / "videos" / f"{video_id}.mp4")
        videos[video_id] = info
        lines.append(json.dumps({
            "qid": f"{split}-{index}", "query": info["target"].name, "duration": VIDEO_SECONDS, "vid": video_id,
            "relevant_windows": [_round(w) for w in info["windows"]], "relevant_clip_ids": info["clip_ids"],
            "saliency_scores": info["scores"],
        }, sort_keys=True))
    path = root / "temporal" / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _generate_refcoco(root: Path, count: int, seed: int) -> dict:
    images, annotations, refs = [], [], []
    for split in SPLITS:
        for index in range(count[split]):
            rng = _rng(seed, split, "region", index)
            image, sprites, masks = make_image(rng, _all_pairs())
            image_id = len(images) + 1
            file_name = f"{split}_{index:05d}.png"
            (root / "refcoco" / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "refcoco" / "images" / file_name, optimize=False)
            images.append({"id": image_id, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
            for object_index, (sprite, mask) in enumerate(zip(sprites, masks)):
                if not mask.any():  # a distractor hidden behind the target
                    continue
                annotation_id = len(annotations) + 1
                annotations.append({
                    "id": annotation_id, "image_id": image_id, "category_id": SHAPES.index(sprite.shape) + 1,
                    "bbox": _box_xywh(mask), "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle_from_mask(mask),
                })
                if object_index == 0:  # the target: a unique colour and shape in its image
                    refs.append({"ref_id": len(refs) + 1, "ann_id": annotation_id, "image_id": image_id,
                                 "split": split, "category_id": SHAPES.index(sprite.shape) + 1,
                                 "sentences": [{"sent": sprite.name, "raw": sprite.name}]})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}
    _dump(root / "refcoco" / "instances.json", instances)
    _dump(root / "refcoco" / "refs.json", refs)
    return {"instances": str(root / "refcoco" / "instances.json"), "refs": str(root / "refcoco" / "refs.json"),
            "image_dir": str(root / "refcoco" / "images")}


def _generate_mevis(root: Path, split: str, count: int, seed: int) -> dict:
    meta, mask_dict = {"videos": {}}, {}
    for index in range(count):
        rng = _rng(seed, split, "mask_video", index)
        sprites = _distinct_sprites(rng, int(rng.integers(1, 3)), _all_pairs(), moving=True)
        for sprite in sprites:
            sprite.speed *= 4  # move visibly within the 4-second clip
            _keep_moving(sprite, (MASK_VIDEO_FRAMES - 1) / MASK_VIDEO_FPS)
        background = textured_background(rng)
        video_id = f"{split}_{index:05d}"
        frame_dir = root / "mevis" / "JPEGImages" / video_id
        frame_dir.mkdir(parents=True, exist_ok=True)
        frames, per_frame = [], []
        for frame_index in range(MASK_VIDEO_FRAMES):
            seconds = frame_index / MASK_VIDEO_FPS
            image = background.copy()
            masks = paint(image, [(s, *s.position(seconds)) for s in reversed(sprites)])[::-1]
            Image.fromarray(image).save(frame_dir / f"{frame_index:05d}.jpg", quality=95)
            frames.append(f"{frame_index:05d}")
            per_frame.append(masks[0])
        annotation_id = str(len(mask_dict))
        mask_dict[annotation_id] = [rle_from_mask(m) for m in per_frame]
        target = sprites[0]
        expression = f"{target.name} moving {target.direction}"
        meta["videos"][video_id] = {"frames": frames, "expressions": {"0": {"exp": expression, "anno_id": [annotation_id],
                                                                             "obj_id": [0]}}}
    _dump(root / "mevis" / split / "meta_expressions.json", meta)
    _dump(root / "mevis" / split / "mask_dict.json", mask_dict)
    return {"meta_expressions": str(root / "mevis" / split / "meta_expressions.json"),
            "mask_dict": str(root / "mevis" / split / "mask_dict.json"), "frames_dir": str(root / "mevis" / "JPEGImages"),
            "fps": MASK_VIDEO_FPS}


def _conversation_on_image(rng, split: str, index: int, root: Path) -> dict:
    """Training conversations never show a held-out colour x shape pair; half of the test ones ask about one."""
    allowed = [p for p in _all_pairs() if p not in HELD_OUT_PAIRS] if split == "train" else _all_pairs()
    first = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))] if split == "test" and index % 2 == 0 else None
    sprites = _without_hidden(_distinct_sprites(rng, int(rng.integers(1, 4)), allowed, moving=False, first_pair=first))
    image = textured_background(rng)
    paint(image, [(s, s.x, s.y) for s in reversed(sprites)])
    file_name = f"{split}_{index:05d}.png"
    (root / "conversation" / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "conversation" / "images" / file_name)
    target = sprites[0]
    kind = ["colour", "shape", "count"][int(rng.integers(3))]
    if kind == "colour":
        question, answer, pool = f"What colour is the {target.shape}?", target.colour, list(COLOURS)
    elif kind == "shape":
        question, answer, pool = f"What shape is the {target.colour} object?", target.shape, list(SHAPES)
    else:
        question, answer, pool = "How many shapes are in the image?", NUMBER_WORDS[len(sprites)], list(NUMBER_WORDS[1:])
    return _conversation_record(rng, f"img-{split}-{index}", {"image": f"images/{file_name}"}, question, answer, pool,
                                kind, target.name)


def _conversation_on_video(rng, split: str, index: int, video_id: str, info: dict) -> dict:
    target = info["target"]
    appearances = sorted(info["appearances"].items(), key=lambda item: item[1])
    unique_first = len(appearances) >= 2 and appearances[1][1] - appearances[0][1] >= 1.0
    if rng.random() < 0.5 or not unique_first:
        question = f"In which direction does the {target.name} move?"
        answer, pool, kind = target.direction, list(DIRECTIONS), "direction"
    else:
        question = "Which shape appears first in the video?"
        answer = appearances[0][0].split()[1]
        pool, kind = [s.shape for s in info["sprites"]] + [s for s in SHAPES], "order"
        pool = list(dict.fromkeys(pool))
    return _conversation_record(rng, f"vid-{split}-{index}", {"video": f"../temporal/videos/{video_id}.mp4"}, question,
                                answer, pool, kind, target.name)


def _conversation_record(rng, record_id: str, media: dict, question: str, answer: str, pool: list[str], kind: str,
                         subject: str) -> dict:
    placeholder = "<image>" if "image" in media else "<video>"
    # `held_out`: the subject is a colour x shape pair that no training conversation shows.
    common = {"id": record_id, **media, "category": kind, "subject": subject,
              "held_out": tuple(subject.split()) in HELD_OUT_PAIRS}
    if rng.random() < 0.5:
        options, letter = _options(rng, answer, pool)
        return {**common, "options": options, "answer": letter,
                "conversations": [{"from": "human", "value": f"{placeholder}\n{_mcq_text(question, options)}"},
                                  {"from": "gpt", "value": letter}]}
    return {**common, "conversations": [{"from": "human", "value": f"{placeholder}\n{question} Answer with one word."},
                                        {"from": "gpt", "value": answer}]}


def _generate_conversations(root: Path, split: str, count: int, seed: int, videos: dict) -> Path:
    records = []
    video_ids = sorted(v for v in videos if v.startswith(split))
    if split == "train":  # training conversations never show a held-out pair, in images or in videos
        video_ids = [v for v in video_ids if not any((s.colour, s.shape) in HELD_OUT_PAIRS for s in videos[v]["sprites"])]
    for index in range(count):
        rng = _rng(seed, split, "conversation", index)
        if video_ids and index % 3 == 2:
            video_id = video_ids[index % len(video_ids)]
            records.append(_conversation_on_video(rng, split, index, video_id, videos[video_id]))
        else:
            records.append(_conversation_on_image(rng, split, index, root))
    path = root / "conversation" / f"{split}.json"
    _dump(path, records)
    return path


PART_FOLDERS = ("temporal", "refcoco", "mevis", "conversation")


def _is_complete(manifest: dict, root: Path, size: str, seed: int) -> bool:
    """Same size, seed, format version and folder, and every annotation file still there."""
    if (manifest.get("size"), manifest.get("seed"), manifest.get("version")) != (size, seed, FORMAT_VERSION):
        return False
    if Path(manifest.get("root", "")).resolve() != root.resolve():
        return False  # moved: the manifest's paths point elsewhere
    files = [value for parts in manifest["splits"].values() for spec in parts.values()
             for key, value in spec.items() if key in ("jsonl", "json", "instances", "refs", "meta_expressions", "mask_dict")]
    return all(Path(f).exists() for f in files)


def generate_synthetic_benchmark(out_dir: str | os.PathLike, size: str = "default", seed: int = 0) -> dict:
    """Write the benchmark under `out_dir` and return its manifest (also `out_dir/manifest.json`).

    A folder that already holds a complete benchmark of the same size, seed and format version is reused
    as it is (its manifest is returned). Otherwise the generator's own folders (temporal/, refcoco/, mevis/,
    conversation/) are replaced; other files in `out_dir` are left alone.
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {list(SIZES)}.")
    root = Path(out_dir)
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if _is_complete(manifest, root, size, seed):
            logger.info("Reusing the synthetic benchmark in %s", root)
            return manifest
    # The manifest goes first and comes back last: a run cut short never looks complete. Only the
    # folders this generator writes are removed, never anything else in `out_dir`.
    manifest_path.unlink(missing_ok=True)
    for part in PART_FOLDERS:
        shutil.rmtree(root / part, ignore_errors=True)
    counts = {part: dict(zip(SPLITS, numbers)) for part, numbers in SIZES[size].items()}
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Generating the synthetic benchmark (%s, seed %d) in %s", size, seed, root)
    videos: dict = {}
    splits = {split: {} for split in SPLITS}
    for split in SPLITS:
        splits[split]["temporal"] = {"format": "qvhighlights", "split": split,
                                     "jsonl": str(_generate_temporal(root, split, counts["temporal"][split], seed, videos)),
                                     "video_dir": str(root / "temporal" / "videos")}
    refcoco = _generate_refcoco(root, counts["region"], seed)
    for split in SPLITS:
        # Every ref gives a box sample; half of them also give a mask sample (image masks are cheap to learn).
        splits[split]["region"] = {"format": "refcoco", **refcoco, "split": split, "tasks": ["region"],
                                   "dataset_name": "synthetic_refcoco"}
        splits[split]["mask_image"] = {"format": "refcoco", **refcoco, "split": split, "tasks": ["mask"],
                                       "dataset_name": "synthetic_refcoco",
                                       "max_samples": max(1, counts["region"][split] // 2)}
        splits[split]["mask_video"] = {"format": "mevis", "split": split, "dataset_name": "synthetic_mevis",
                                       **_generate_mevis(root, split, counts["mask_video"][split], seed)}
        splits[split]["conversation"] = {"format": "llava", "media_dir": str(root / "conversation"), "split": split,
                                         "fps": VIDEO_FPS,
                                         "json": str(_generate_conversations(root, split, counts["conversation"][split],
                                                                             seed, videos))}
    manifest = {"version": FORMAT_VERSION, "size": size, "seed": seed, "root": str(root), "splits": splits,
                "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS]}
    _dump(manifest_path, manifest)
    return manifest


def load_split(manifest: dict, split: str,
               parts: tuple[str, ...] = ("temporal", "region", "mask_image", "mask_video", "conversation")):
    """The schema datasets of one split, one per part, read with the real readers."""
    from .readers import read_spec

    return {part: read_spec(manifest["splits"][split][part]) for part in parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", default="default", choices=list(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = generate_synthetic_benchmark(args.out, size=args.size, seed=args.seed)
    logger.info("Wrote %s", Path(args.out) / "manifest.json")
    for split, parts in manifest["splits"].items():
        logger.info("%s: %s", split, ", ".join(parts))


if __name__ == "__main__":
    main()
