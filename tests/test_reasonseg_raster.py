"""ReasonSeg ground truth as LISA builds it: OpenCV 4.8's polygon drawing, reproduced without OpenCV,
and LISA's label rules (flag, ignore, painting order, encodings)."""

import json

import numpy as np
import pytest

from tpo.processing.reasonseg import IGNORE, TARGET, draw_polygon, read_labelme_json, reasonseg_label_map


def _drawn(points, height=6, width=7):
    canvas = np.zeros((height, width), np.uint8)
    draw_polygon(canvas, np.array(points), 1)
    return canvas


def test_square_is_outline_plus_fill_after_truncation():
    # The case: a 10.7-20.3 square. LISA truncates to 10..20 and draws the outline + interior:
    # 11 x 11 = 121 pixels (pycocotools' area rasterisation of the float polygon gives 81).
    shapes = [{"label": "target", "points": [[10.7, 10.7], [20.3, 10.7], [20.3, 20.3], [10.7, 20.3]]}]
    labels = reasonseg_label_map(shapes, 32, 32)
    assert int((labels == TARGET).sum()) == 121
    assert (labels[10:21, 10:21] == TARGET).all()


def test_triangle_by_hand():
    # Edges as 8-connected lines: (1,1)-(5,1) row 1; (1,1)-(3,4): (2,2), (2,3); (5,1)-(3,4): (4,2), (4,3).
    # Rows 1-3 filled between the edges' x at the row (pixel centres 1.5 + k*2/3 and 5.5 - k*2/3, floored).
    expected = np.array([[0, 0, 0, 0, 0, 0, 0],
                         [0, 1, 1, 1, 1, 1, 0],
                         [0, 0, 1, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 1, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 0]], np.uint8)
    assert np.array_equal(_drawn([[1, 1], [5, 1], [3, 4]]), expected)


def test_polygons_across_the_border_as_opencv_4_8_draws_them():
    # Drawn with cv2.polylines + cv2.fillPoly of opencv-python-headless 4.8.0.74 (LISA's pinned version).
    expected = np.array([[0, 0, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 1, 0],
                         [0, 0, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 1]], np.uint8)
    assert np.array_equal(_drawn([[-2, 2], [4, -1], [8, 5]]), expected)


def test_degenerate_shapes_are_lines_and_points():
    assert np.array_equal(np.argwhere(_drawn([[3, 2]])), [[2, 3]])
    assert np.array_equal(np.argwhere(_drawn([[1, 4], [5, 4]])), [[4, x] for x in range(1, 6)])


def test_label_rules_flag_ignore_and_painting_order():
    big = [[0, 0], [19, 0], [19, 19], [0, 19]]
    hole = [[5, 5], [9, 5], [9, 9], [5, 9]]
    inner_target = [[6, 6], [8, 6], [8, 8], [6, 8]]
    shapes = [
        {"label": "target", "points": big},
        {"label": "Ignore_region", "points": hole},  # "ignore" as a substring, any case: painted after the big one
        {"label": "FLAG", "points": [[0, 0], [19, 0], [0, 19]]},  # left out
        {"label": "target", "points": inner_target},  # smallest: painted last, a target inside the ignore hole
    ]
    labels = reasonseg_label_map(shapes, 20, 20)
    assert labels[0, 0] == TARGET and labels[5, 5] == IGNORE and labels[7, 7] == TARGET
    assert int((labels == IGNORE).sum()) == 25 - 9
    assert int((labels == TARGET).sum()) == 400 - 25 + 9


def test_cp1252_fallback_and_bad_json(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(json.dumps({"text": ["caf\u00e9"], "shapes": []}).replace("\\u00e9", "\u00e9").encode("cp1252"))
    assert read_labelme_json(path)["text"] == ["caf\u00e9"]
    path.write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match="a.json: not valid JSON"):
        read_labelme_json(path)
    with pytest.raises(ValueError, match="shape 0 .* unreadable points"):
        reasonseg_label_map([{"label": "target", "points": [[1, float("nan")], [2, 2], [3, 1]]}], 5, 5, "x.json")
