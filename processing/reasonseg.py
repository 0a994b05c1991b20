"""ReasonSeg ground truth exactly as LISA builds it (`get_mask_from_json` in LISA's `utils/data_processing.py`).

A ReasonSeg json holds labelme `shapes` (polygons with a `label`) and `text` queries. LISA:
- reads the json as UTF-8 and falls back to cp1252 (some files are not UTF-8);
- takes the image size from `cv2.imread`, which applies the EXIF orientation;
- leaves out shapes labelled "flag" (any case); a label *containing* "ignore" (any case) marks a region
  left out of the scores (value 255), every other label a target (value 1);
- truncates the points to integers (`np.array(points, dtype=np.int32)`), and rasterises each polygon as
  OpenCV draws it: `cv2.polylines` (thickness 1, 8-connected) then `cv2.fillPoly`;
- paints the polygons largest first (area of the drawn polygon; `np.argsort(areas)[::-1]`, so among equal
  areas the later shape first), each over the ones before: an "ignore" polygon inside a target polygon
  punches a 255 hole in it, a target inside an "ignore" one is a target.
OpenCV is not a dependency: `draw_polygon` reproduces `cv2.polylines` + `cv2.fillPoly` of OpenCV 4.8
(LISA pins opencv_python==4.8.0.74) for integer vertices: its fixed-point scanline fill and 8-connected
lines, with its clipping at the image border. Checked pixel for pixel against OpenCV 4.8.0 on 3,000
random polygons (1-12 points, inside, across and outside the border): all equal. OpenCV 5 draws
polygons differently (1,154 of the same 3,000 differ), so it would not give LISA's masks either.
"""

import json
from pathlib import Path

import numpy as np

TARGET, IGNORE = 1, 255
_XY_SHIFT = 16  # OpenCV's fixed-point precision for polygon edges
_XY_ONE = 1 << _XY_SHIFT


def read_labelme_json(path) -> dict:
    """A ReasonSeg/labelme json as LISA reads it: UTF-8, else cp1252. Broken JSON raises naming the file."""
    raw = Path(path).read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); fix the file.") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}: expected a JSON object with 'shapes' and 'text', got {type(record).__name__}.")
        return record
    raise ValueError(f"{path}: neither UTF-8 nor cp1252 text; re-save it as UTF-8 JSON.")


def _clip_line(x1: int, y1: int, x2: int, y2: int, width: int, height: int):
    """OpenCV's `clipLine` (Cohen-Sutherland with truncating integer steps): the segment inside
    [0, width-1] x [0, height-1], and whether any of it is inside."""
    right, bottom = width - 1, height - 1

    def code(x, y):
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += int((a - y1) * (x2 - x1) / (y2 - y1))
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += int((a - y2) * (x2 - x1) / (y2 - y1))
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += int((a - x1) * (y2 - y1) / (x2 - x1))
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += int((a - x2) * (y2 - y1) / (x2 - x1))
                x2 = a
                c2 = 0
    return x1, y1, x2, y2, (c1 | c2) == 0


def _draw_line(canvas: np.ndarray, x1: int, y1: int, x2: int, y2: int, value: int) -> None:
    """OpenCV's 8-connected line (`LineIterator`, left to right), clipped to the canvas."""
    height, width = canvas.shape
    if not (0 <= x1 < width and 0 <= x2 < width and 0 <= y1 < height and 0 <= y2 < height):
        x1, y1, x2, y2, inside = _clip_line(x1, y1, x2, y2, width, height)
        if not inside:
            return
    if x2 < x1:
        x1, y1, x2, y2 = x2, y2, x1, y1
    dx, dy = x2 - x1, y2 - y1
    step_y = -1 if dy < 0 else 1
    dy = abs(dy)
    y_major = dy > dx
    major, minor = (dy, dx) if y_major else (dx, dy)
    error = major - 2 * minor
    x, y = x1, y1
    for _ in range(major + 1):
        canvas[y, x] = value
        diagonal = error < 0
        error += -2 * minor + (2 * major if diagonal else 0)
        if y_major:
            y += step_y
            x += int(diagonal)
        else:
            x += 1
            y += step_y * int(diagonal)


def draw_polygon(canvas: np.ndarray, points_xy: np.ndarray, value: int) -> None:
    """Paint one closed polygon with integer vertices `(k, 2)` (x, y) onto `canvas` `(H, W)` uint8, as
    `cv2.polylines(canvas, [points], True, value, 1)` followed by `cv2.fillPoly(canvas, [points], value)`.

    fillPoly draws each edge as an 8-connected line and fills the scanlines between the edges' fixed-point
    x positions (an edge covers rows y0 <= y < y1; its x starts at the upper vertex's pixel centre and
    steps by the truncated slope), so the result is the outline plus the interior.
    """
    height, width = canvas.shape
    points = [(int(x), int(y)) for x, y in np.asarray(points_xy, dtype=np.int64).reshape(-1, 2)]
    if not points:
        return
    edges = []  # (y0, y1, x at y0 in fixed point, dx per row in fixed point)
    previous = points[-1]
    for current in points:
        (x0, y0), (x1, y1) = previous, current
        _draw_line(canvas, x0, y0, x1, y1, value)  # polylines and fillPoly both draw the outline
        fixed0, fixed1 = [x0 << _XY_SHIFT, y0], [x1 << _XY_SHIFT, y1]
        if not (0 <= x0 < width and 0 <= x1 < width and 0 <= y0 < height and 0 <= y1 < height):
            cx0, cy0, cx1, cy1, _ = _clip_line(x0, y0, x1, y1, width, height)
            if cy0 != cy1:  # the edge from the clipped end points
                fixed0, fixed1 = [cx0 << _XY_SHIFT, cy0], [cx1 << _XY_SHIFT, cy1]
        else:
            fixed0[0] += _XY_ONE >> 1
            fixed1[0] += _XY_ONE >> 1
        previous = current
        if y0 == y1:
            continue
        step = int((fixed1[0] - fixed0[0]) / (fixed1[1] - fixed0[1]))  # C integer division: towards zero
        top, bottom = (y0, y1) if y0 < y1 else (y1, y0)
        start = fixed0 if y0 < y1 else fixed1
        edges.append((top, bottom, start[0] + (top - start[1]) * step, step))
    if len(edges) < 2:
        return
    for y in range(max(min(e[0] for e in edges), 0), min(max(e[1] for e in edges), height)):
        xs = sorted(x + (y - top) * step for top, bottom, x, step in edges if top <= y < bottom)
        for left, right in zip(xs[0::2], xs[1::2]):
            x_start, x_end = left >> _XY_SHIFT, right >> _XY_SHIFT
            if x_start < width and x_end >= 0:
                canvas[y, max(x_start, 0) : min(x_end, width - 1) + 1] = value


def _as_int32_points(points) -> np.ndarray:
    """`np.array(points, dtype=np.int32)`: coordinates truncated towards zero, as LISA passes them to OpenCV."""
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(array).all():
        raise ValueError("a polygon point is not a finite number")
    return np.trunc(array).astype(np.int64)


def reasonseg_label_map(shapes: list, height: int, width: int, where: str = "shapes") -> np.ndarray:
    """`(height, width)` uint8: 0 background, 1 target, 255 ignored, from labelme `shapes` as LISA paints them."""
    drawn = []
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("points"), list):
            raise ValueError(f"{where}: shape {index} has no 'points' list; each shape needs a label and points.")
        label = str(shape.get("label", ""))
        if label.lower() == "flag":  # deprecated annotations, left out by LISA
            continue
        try:
            points = _as_int32_points(shape["points"])
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: shape {index} ({label!r}) has unreadable points ({error}); give [[x, y], ...].") from error
        alone = np.zeros((height, width), dtype=np.uint8)
        draw_polygon(alone, points, 1)
        drawn.append((int(alone.sum()), points, IGNORE if "ignore" in label.lower() else TARGET))
    labels = np.zeros((height, width), dtype=np.uint8)
    order = np.argsort([area for area, _, _ in drawn], kind="stable")[::-1]  # largest first; ties: later shape first
    for index in order:
        _, points, value = drawn[index]
        draw_polygon(labels, points, value)
    return labels
