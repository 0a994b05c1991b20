"""COCO run-length encoding (RLE): checked decoding, encoding, polygons.

An RLE is `{"size": [h, w], "counts": ...}`: column-major runs, alternately background and foreground,
as COCO's compressed string (or bytes) or a list of run lengths. `check_rle` refuses runs that do not
cover h * w exactly, naming where the RLE came from, before pycocotools decodes anything.

The one implementation: the processor (`processing_tpo.py`) imports it, so `save_pretrained` copies this file
with the processor as remote code; the scoring CLI uses it without torch. Imports nothing from the project;
numpy only at import, pycocotools where masks are encoded or decoded.
"""

import numpy as np

_MAX_CHARS_PER_COUNT = 13  # 13 x 5 bits > 64: a longer group is not a run length


def _compressed_counts(counts: bytes) -> np.ndarray:
    """Run lengths of COCO's compressed counts string (pycocotools' `rleFrString`), as int64 (a corrupt
    string can give negative runs, which pycocotools would wrap to huge unsigned ones)."""
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ((chars < 0) | (chars > 63)).any():
        raise ValueError("characters outside COCO's compressed RLE alphabet ('0' to 'o')")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise ValueError("the string ends in the middle of a run length")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHARS_PER_COUNT:
        raise ValueError("a run length longer than 64 bits")
    group = np.repeat(np.arange(len(ends)), lengths)
    position = np.arange(len(chars)) - starts[group]
    values = np.zeros(len(ends), dtype=np.int64)
    np.add.at(values, group, (chars & 0x1F) << (5 * position))
    negative = (chars[ends] & 0x10) != 0  # sign bit of the last 5-bit group
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    runs = values.copy()  # from the third run on, each is stored as the difference to the run two before
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_counts(rle: dict) -> np.ndarray:
    """The run lengths `(m,)` int64 of an RLE (compressed string/bytes or uncompressed list counts)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        return _compressed_counts(counts.encode("ascii", errors="replace"))
    if isinstance(counts, bytes):
        return _compressed_counts(counts)
    runs = np.asarray(counts)
    if runs.ndim != 1 or (runs.size and not np.issubdtype(runs.dtype, np.integer)):
        raise ValueError(f"uncompressed counts must be a list of integers, got {str(counts)[:40]}")
    return runs.astype(np.int64)


def rle_size(rle: dict, where: str) -> tuple[int, int]:
    """(h, w) of an RLE, checked."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0
                                                                          for v in size):
        raise ValueError(f"{where}: an RLE needs 'size': [height, width] (two integers >= 0), got {size!r}.")
    if "counts" not in rle:
        raise ValueError(f"{where}: an RLE needs 'counts' (COCO's string or a list of run lengths).")
    return int(size[0]), int(size[1])


def check_rle(rle: dict, where: str) -> None:
    """Raise ValueError naming `where` unless the RLE's runs are non-negative and cover its h x w pixels exactly."""
    height, width = rle_size(rle, where)
    try:
        runs = rle_counts(rle)
    except (ValueError, TypeError, UnicodeError) as error:
        raise ValueError(f"{where}: RLE counts cannot be read ({error}); the mask is corrupt.") from error
    if (runs < 0).any():
        raise ValueError(f"{where}: RLE counts hold a negative run ({int(runs.min())}); the mask is corrupt.")
    total = int(runs.sum())
    if total != height * width:
        raise ValueError(f"{where}: RLE counts sum to {total} pixels but its size {height}x{width} has {height * width}; "
                         f"the mask is corrupt or its 'size' is wrong.")


def mask_from_rle(rle: dict, where: str = "mask") -> np.ndarray:
    """COCO RLE (string or bytes counts, or uncompressed list counts) -> bool (h, w), checked first."""
    from pycocotools import mask as mask_utils

    check_rle(rle, where)
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (list, tuple, np.ndarray)):
        counts = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)["counts"]
    encoded = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).astype(bool)


def rle_from_mask(mask: np.ndarray) -> dict:
    """bool (h, w) -> COCO RLE {"size": [h, w], "counts": str}."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def rle_from_polygons(polygons: list[list[float]], height: int, width: int) -> dict:
    """COCO polygons ([[x0, y0, x1, y1, ...], ...], 3 or more points each) -> one merged RLE with string counts.

    COCO's own rasterisation (RefCOCO's masks); ReasonSeg's masks follow LISA's OpenCV rasterisation instead
    (`reasonseg.draw_polygon`), which differs pixel for pixel, so the two are not interchangeable."""
    from pycocotools import mask as mask_utils

    for index, polygon in enumerate(polygons):
        if len(polygon) < 6 or len(polygon) % 2:
            raise ValueError(f"polygon {index} has {len(polygon)} coordinates; a polygon needs 3 or more (x, y) points.")
    rles = mask_utils.frPyObjects([[float(v) for v in polygon] for polygon in polygons], height, width)
    merged = mask_utils.merge(rles) if isinstance(rles, list) else rles
    return {"size": [int(v) for v in merged["size"]], "counts": merged["counts"].decode("ascii")}
