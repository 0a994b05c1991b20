"""Visualisations: image sizes and the drawn content at the right places."""

import json

import av
import numpy as np
import pytest
from PIL import Image

from tpo import visualization as vis
from tpo.training.metrics import mask_to_rle

GRAY = 128


def _pixel(image: Image.Image, x: float, y: float) -> tuple:
    return image.getpixel((int(round(x)), int(round(y))))


def _middle(row: tuple[int, int]) -> float:
    return (row[0] + row[1]) / 2


@pytest.fixture
def timeline():
    red_frame = np.zeros((30, 40, 3), np.uint8)
    red_frame[..., 0] = 255
    gt_saliency = np.zeros((30, 3), int)
    gt_saliency[3] = 4  # clip 3 = [6, 8] s at full height
    image = vis.render_timeline(60, [[10, 20, 0.9], [30, 40, 0.4]], [[12, 22]], pred_saliency_scores=[0.3] * 30,
                                gt_saliency_scores=gt_saliency, frames=[red_frame], frame_times_seconds=[45.0],
                                query="a person opens the door")
    layout = vis.timeline_layout(60, 2, has_saliency=True, has_thumbnails=True, has_title=True)
    return image, layout


def test_timeline_size_and_span_bars(timeline):
    image, layout = timeline
    assert image.size == (layout.width, layout.height) == (1000, layout.height)
    gt_y, top_y, second_y = _middle(layout.gt_row), _middle(layout.pred_rows[0]), _middle(layout.pred_rows[1])
    assert _pixel(image, layout.x_of(17), gt_y) == vis.GT_COLOR
    assert _pixel(image, layout.x_of(5), gt_y) == vis.BACKGROUND and _pixel(image, layout.x_of(30), gt_y) == vis.BACKGROUND
    assert _pixel(image, layout.x_of(15), top_y) == vis.PRED_COLORS[0]  # top-scored window [10, 20]
    assert _pixel(image, layout.x_of(21), top_y) == vis.GT_BAND_COLOR  # past the prediction, inside the GT window
    assert _pixel(image, layout.x_of(25), top_y) == vis.BACKGROUND
    assert _pixel(image, layout.x_of(35), second_y) == vis._blend(vis.PRED_COLORS[0], 0.45)  # second window, lighter
    assert _pixel(image, layout.x_of(35), top_y) == vis.BACKGROUND


def test_timeline_thumbnail_and_saliency(timeline):
    image, layout = timeline
    assert _pixel(image, layout.x_of(45), _middle(layout.thumbnail_row)) == (255, 0, 0)  # thumbnail centred at 45 s
    assert _pixel(image, layout.x_of(10), _middle(layout.thumbnail_row)) == vis.BACKGROUND
    bottom = layout.saliency_row[1] - 4
    assert _pixel(image, layout.x_of(7), bottom - 3) == vis.GT_SALIENCY_COLOR  # the GT bar of clip 3
    assert _pixel(image, layout.x_of(11), bottom - 3) == vis.BACKGROUND  # no GT saliency at clip 5
    # A constant prediction is drawn as a flat line halfway up the plot.
    column = np.asarray(image)[layout.saliency_row[0] : layout.saliency_row[1], int(layout.x_of(31))]
    rows = np.flatnonzero((column == vis.SALIENCY_COLOR).all(axis=1)) + layout.saliency_row[0]
    halfway = bottom - 0.5 * (bottom - (layout.saliency_row[0] + 6))
    assert len(rows) and abs(rows.mean() - halfway) <= 1.5


def test_boxes_outline_colours_and_legend():
    image = np.full((120, 160, 3), GRAY, np.uint8)
    drawn = vis.render_boxes(image, [[10, 20, 60, 80]], [[70, 30, 150, 100]], pred_scores=[0.87])
    assert drawn.height == 120 + vis.LEGEND_HEIGHT and drawn.width >= 160
    assert _pixel(drawn, 10, 50) == vis.PRED_COLORS[0] and _pixel(drawn, 60, 50) == vis.PRED_COLORS[0]
    assert _pixel(drawn, 110, 30) == vis.GT_COLOR and _pixel(drawn, 150, 60) == vis.GT_COLOR
    assert _pixel(drawn, 35, 50) == (GRAY,) * 3 and _pixel(drawn, 110, 60) == (GRAY,) * 3  # interiors untouched
    legend = np.asarray(drawn)[120:]
    for color in (vis.GT_COLOR, vis.PRED_COLORS[0]):
        assert (legend == color).all(axis=-1).sum() >= 100  # a 13 x 13 swatch each


def test_boxes_legend_widens_a_narrow_image():
    drawn = vis.render_boxes(np.full((20, 30, 3), GRAY, np.uint8), [[1, 1, 10, 10], [5, 5, 20, 15]], [[2, 2, 12, 12]])
    assert drawn.width > 30 and _pixel(drawn, 1, 5) == vis.PRED_COLORS[0]
    assert _pixel(drawn, 20, 10) == vis.PRED_COLORS[1]  # the second prediction has its own colour


def test_mask_overlay_blends_prediction_and_outlines_gt():
    image = np.full((40, 50, 3), GRAY, np.uint8)
    pred = np.zeros((40, 50), bool)
    pred[5:20, 5:25] = True
    gt = np.zeros((40, 50), bool)
    gt[22:35, 30:45] = True
    drawn = vis.render_mask_overlay(image, mask_to_rle(pred), gt)
    assert drawn.height == 40 + vis.LEGEND_HEIGHT
    blended = tuple(int(round(GRAY * 0.5 + c * 0.5)) for c in vis.PRED_COLORS[0])
    assert _pixel(drawn, 10, 10) == blended
    assert _pixel(drawn, 30, 28) == vis.GT_COLOR and _pixel(drawn, 44, 28) == vis.GT_COLOR  # left and right edges
    assert _pixel(drawn, 37, 28) == (GRAY,) * 3  # GT interior is only outlined
    assert _pixel(drawn, 2, 38) == (GRAY,) * 3


def test_mask_grid_layout():
    frames = [np.full((30, 40, 3), GRAY, np.uint8) for _ in range(6)]
    mask = np.zeros((30, 40), bool)
    mask[10:20, 10:30] = True
    pred = [None] * 5 + [mask]
    grid = vis.render_mask_grid(frames, pred, columns=4, tile_width=80)
    tile_height = 60
    assert grid.size == (4 * 80, 2 * (tile_height + vis.CAPTION_HEIGHT))
    top = tile_height + vis.CAPTION_HEIGHT + vis.CAPTION_HEIGHT  # row 1, below its caption
    blended = tuple(int(round(GRAY * 0.5 + c * 0.5)) for c in vis.PRED_COLORS[0])
    assert _pixel(grid, 80 + 40, top + 30) == blended  # frame 5: row 1, column 1, mask centre
    assert _pixel(grid, 40, vis.CAPTION_HEIGHT + 30) == (GRAY,) * 3  # frame 0 has no mask
    with pytest.raises(ValueError, match="6 frames, 5 predicted masks"):
        vis.render_mask_grid(frames, pred[:5])


def _write_video(path, seconds=2, fps=10):
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for index in range(seconds * fps):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * index % 255, np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()


def test_cli_writes_each_kind(tmp_path):
    Image.fromarray(np.full((30, 40, 3), GRAY, np.uint8)).save(tmp_path / "f0.png")
    _write_video(tmp_path / "clip.mp4")
    mask = mask_to_rle(np.pad(np.ones((10, 10), bool), ((5, 15), (5, 25))))
    inputs = {
        "timeline": {"duration": 2.0, "query": "q", "pred_relevant_windows": [[0.5, 1.5, 0.7]], "relevant_windows": [[0, 1]],
                     "relevant_clip_ids": [0], "saliency_scores": [[1, 2, 3]], "pred_saliency_scores": [0.2],
                     "video": "clip.mp4", "num_thumbnails": 3},
        "boxes": {"image": "f0.png", "pred_bbox": [5, 5, 10, 10], "gt_boxes_xyxy": [[1, 1, 20, 20]]},
        "masks": {"frames": ["f0.png", "f0.png"], "pred_masks": [mask, None], "gt_masks": [None, mask], "columns": 2},
    }
    for kind, record in inputs.items():
        source = tmp_path / f"{kind}.json"
        source.write_text(json.dumps(record))
        output = tmp_path / "out" / f"{kind}.png"
        vis.main([kind, "--input", str(source), "--output", str(output)])
        with Image.open(output) as written:
            assert written.format == "PNG" and written.width > 0
            if kind == "boxes":
                assert written.getpixel((5, 10)) == vis.PRED_COLORS[0]  # xywh converted: left edge at x = 5
            if kind == "masks":
                assert written.size == (2 * 240, 180 + vis.CAPTION_HEIGHT)
    with pytest.raises(FileNotFoundError, match="missing.png: image not found"):
        (tmp_path / "bad.json").write_text(json.dumps({"image": "missing.png"}))
        vis.main(["boxes", "--input", str(tmp_path / "bad.json"), "--output", str(tmp_path / "bad.png")])
