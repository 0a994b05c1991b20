"""Single-object tracking benchmarks: LaSOT and GOT-10k sequences as file lists, never as decoded frames.

A `TrackingSequence` names every frame file in order, the ground-truth boxes `(x, y, w, h)` in pixels (all
frames, or only the first on GOT-10k's test split), the target's visibility per frame as the toolkits read it,
the frame size and a description of the target (LaSOT `nlp.txt`, GOT-10k's `object_class`, else the class
name). Frames are read one at a time by whoever tracks (`tpo.training.tracking`), so a sequence of any length
costs a list of paths.

Layouts:
- LaSOT: `<root>/<class>/<class>-<n>/` with `img/00000001.jpg ...`, `groundtruth.txt` (one `x,y,w,h` a frame),
  `full_occlusion.txt` and `out_of_view.txt` (one comma-separated 0/1 line), `nlp.txt`; the test split is listed
  in `testing_set.txt` (pass it, or a list of names, as `sequences`).
- GOT-10k: `<root>/<split>/<seq>/` with `00000001.jpg ...`, `groundtruth.txt`, `absence.label` (1: absent),
  `cover.label` (0-8, 0: fully covered), `meta_info.ini` (`resolution: (W, H)`, `object_class`), and
  `<root>/<split>/list.txt`.

Bad input raises a ValueError naming the sequence folder: no `groundtruth.txt`, a box line that is not four
numbers, frames missing from the folder (the first missing file is named), a first box that is empty or lies
outside the frame.
"""

import configparser
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TRACKING_PROTOCOLS = ("lasot", "got10k")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class TrackingSequence:
    """One sequence. `boxes_xywh` (n_gt, 4) pixels, n_gt = len(frame_paths) or 1 (GOT-10k test); `visible`
    (n_gt,) bool; `image_size` (height, width) of the frames."""

    name: str
    protocol: str
    folder: str
    frame_paths: list[str]
    boxes_xywh: np.ndarray
    visible: np.ndarray
    image_size: tuple[int, int]
    description: str

    @property
    def first_box_xywh(self) -> np.ndarray:
        return self.boxes_xywh[0]

    @property
    def annotated(self) -> bool:
        """Every frame has a ground-truth box (scorable here, not only on a server)."""
        return len(self.boxes_xywh) == len(self.frame_paths)


def read_boxes(path: Path) -> np.ndarray:
    """(n, 4) boxes of a groundtruth file, one `x,y,w,h` a line (commas, tabs or spaces); "NaN" is kept."""
    rows = []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        values = re.split(r"[,\s]+", line.strip())
        try:
            row = [float(v) for v in values]
        except ValueError as error:
            raise ValueError(f"{path} line {line_number}: {line.strip()!r} is not four numbers x,y,w,h.") from error
        if len(row) != 4:
            raise ValueError(f"{path} line {line_number}: {line.strip()!r} is not four numbers x,y,w,h.")
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _flags(path: Path, count: int) -> np.ndarray:
    values = [int(float(v)) for v in re.split(r"[,\s]+", path.read_text(encoding="utf-8").strip()) if v]
    if len(values) < count:
        raise ValueError(f"{path}: {len(values)} flags for {count} frames; the file needs one per frame.")
    return np.asarray(values[:count], dtype=np.int64)


def _frame_files(folder: Path, expected: int, name: str) -> list[str]:
    """The numbered frames `00000001.<ext>`, ... of a folder; every number from 1 up must be there (and at least
    `expected` of them)."""
    numbered = {}
    for entry in os.listdir(folder) if folder.is_dir() else ():
        stem, extension = os.path.splitext(entry)
        if extension.lower() in FRAME_EXTENSIONS and stem.isdigit():
            numbered[int(stem)] = entry
    count = max(len(numbered), expected)
    missing = next((i for i in range(1, count + 1) if i not in numbered), None)
    if missing is not None:
        example = next(iter(numbered.values()), "00000001.jpg")
        width, extension = len(os.path.splitext(example)[0]), os.path.splitext(example)[1]
        raise ValueError(f"Sequence {name}: frame {missing} ({folder / (str(missing).zfill(width) + extension)}) is "
                         f"missing; {folder} has {len(numbered)} numbered frames for {expected} ground-truth boxes.")
    frames = [str(folder / numbered[i]) for i in range(1, count + 1)]
    if 1 < expected < len(frames):
        logger.warning("Sequence %s: %d frames for %d ground-truth boxes; the frames past the last box are left out.",
                       name, len(frames), expected)
        frames = frames[:expected]
    return frames


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def _check_first_box(box: np.ndarray, size: tuple[int, int], where: str) -> None:
    height, width = size
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"{where} line 1: the first box {box.tolist()} is empty; tracking starts from a box with "
                         "width and height > 0.")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ValueError(f"{where} line 1: the first box {box.tolist()} lies outside the {width}x{height} frame.")


def _sequence_names(sequences) -> list[str] | None:
    if sequences is None:
        return None
    if isinstance(sequences, (str, os.PathLike)):
        return [line.strip() for line in Path(sequences).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(s) for s in sequences]


def _select(found: dict, names: list[str] | None, root) -> list[str]:
    if names is None:
        return sorted(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"{root}: no sequence folder for {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                         f"({len(unknown)} of {len(names)} requested).")
    return names


def read_lasot(root: str, sequences: list[str] | str | None = None) -> list[TrackingSequence]:
    """LaSOT sequences under `root` (`<class>/<class>-<n>/`, or the sequence folders directly). `sequences`: names,
    or a file listing them (`testing_set.txt`); default every sequence found. Visibility: not full_occlusion and
    not out_of_view. Description: `nlp.txt`, else the class name."""
    root = Path(root)
    found = {p.parent.name: p.parent for p in root.rglob("groundtruth.txt")}
    if not found:
        raise ValueError(f"{root}: no <class>/<class>-<n>/groundtruth.txt found; pass the LaSOT root folder.")
    out = []
    for name in _select(found, _sequence_names(sequences), root):
        folder = found[name]
        gt_path = folder / "groundtruth.txt"
        boxes = read_boxes(gt_path)
        frames = _frame_files(folder / "img", len(boxes), name)
        visible = np.ones(len(boxes), dtype=bool)
        for flag_file in ("full_occlusion.txt", "out_of_view.txt"):
            if (folder / flag_file).exists():
                visible &= _flags(folder / flag_file, len(boxes)) == 0
        size = _image_size(frames[0])
        _check_first_box(boxes[0], size, str(gt_path))
        nlp = folder / "nlp.txt"
        description = nlp.read_text(encoding="utf-8").strip() if nlp.exists() else name.rsplit("-", 1)[0]
        out.append(TrackingSequence(name=name, protocol="lasot", folder=str(folder), frame_paths=frames,
                                    boxes_xywh=boxes, visible=visible, image_size=size, description=description))
    return out


def _meta_info(path: Path) -> dict:
    """`meta_info.ini` of a GOT-10k sequence as a dict (section [METAINFO])."""
    if not path.exists():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(path.read_text(encoding="utf-8"))
    return dict(parser["METAINFO"]) if parser.has_section("METAINFO") else {}


def _resolution(meta: dict, where: Path) -> tuple[int, int] | None:
    """(height, width) from `resolution: (W, H)`."""
    if "resolution" not in meta:
        return None
    numbers = re.findall(r"\d+", meta["resolution"])
    if len(numbers) != 2:
        raise ValueError(f"{where}: resolution {meta['resolution']!r} is not '(width, height)'.")
    return int(numbers[1]), int(numbers[0])


def read_got10k(root: str, sequences: list[str] | str | None = None) -> list[TrackingSequence]:
    """GOT-10k sequences of one split folder (`root` holds `<seq>/` and `list.txt`). `sequences`: names or a file
    listing them; default `list.txt`, else every folder with a `groundtruth.txt`. Visibility: not absent
    (`absence.label`), else cover > 0 (`cover.label`). Size: `meta_info.ini`'s resolution, else the first frame.
    The test split's `groundtruth.txt` has the first box only: those sequences are not `annotated`."""
    root = Path(root)
    found = {p.parent.name: p.parent for p in root.glob("*/groundtruth.txt")}
    if not found:
        raise ValueError(f"{root}: no <sequence>/groundtruth.txt found; pass a GOT-10k split folder (train/val/test).")
    names = _sequence_names(sequences)
    if names is None and (root / "list.txt").exists():
        names = _sequence_names(root / "list.txt")
    out = []
    for name in _select(found, names, root):
        folder = found[name]
        gt_path = folder / "groundtruth.txt"
        boxes = read_boxes(gt_path)
        frames = _frame_files(folder, len(boxes), name)
        visible = np.ones(len(boxes), dtype=bool)
        if (folder / "absence.label").exists():
            visible = _flags(folder / "absence.label", len(boxes)) == 0
        elif (folder / "cover.label").exists():
            visible = _flags(folder / "cover.label", len(boxes)) > 0
        meta = _meta_info(folder / "meta_info.ini")
        size = _resolution(meta, folder / "meta_info.ini") or _image_size(frames[0])
        _check_first_box(boxes[0], size, str(gt_path))
        out.append(TrackingSequence(name=name, protocol="got10k", folder=str(folder), frame_paths=frames,
                                    boxes_xywh=boxes, visible=visible, image_size=size,
                                    description=meta.get("object_class", "").strip() or "target"))
    return out


TRACKING_READERS = {"lasot": read_lasot, "got10k": read_got10k}
