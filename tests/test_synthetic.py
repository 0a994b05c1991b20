"""The synthetic benchmark: deterministic, answers that match the drawn pixels, loadable by the readers."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpo.processing.schema import mask_from_rle, validate_sample
from tpo.processing.synthetic import (
    COLOURS,
    DIRECTIONS,
    HELD_OUT_PAIRS,
    MASK_VIDEO_FPS,
    SIZES,
    VIDEO_FPS,
    VIDEO_SECONDS,
    _clip_saliency,
    generate_synthetic_benchmark,
    make_temporal_video,
    load_split,
    main,
    shape_mask,
)
from tpo.processing.video import load_video

ANNOTATION_FILES = ("jsonl", "json", "instances", "refs", "meta_expressions", "mask_dict")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_benchmark(root, size="small", seed=0)


@pytest.fixture(scope="module")
def splits(bench):
    return {split: load_split(bench, split) for split in ("train", "val", "test")}


def annotation_bytes(manifest: dict) -> dict:
    root = Path(manifest["root"])
    files = {str(Path(spec[key]).relative_to(root)) for parts in manifest["splits"].values()
             for spec in parts.values() for key in ANNOTATION_FILES if key in spec}
    return {name: (root / name).read_bytes() for name in sorted(files)}


def palette_distance(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.abs(pixels.astype(np.int32) - np.array(COLOURS[colour])).max(axis=-1)


def test_same_seed_same_annotation_bytes(bench, tmp_path):
    again = generate_synthetic_benchmark(tmp_path / "again", size="small", seed=0)
    first, second = annotation_bytes(bench), annotation_bytes(again)
    assert len(first) == 3 + 2 + 3 * 2 + 3  # jsonl x3, instances + refs, MeViS pair x3, conversations x3
    assert first == second
    other = annotation_bytes(generate_synthetic_benchmark(tmp_path / "other", size="small", seed=1))
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first)


def test_reuse_and_regeneration(tmp_path):
    root = tmp_path / "bench"
    root.mkdir()
    (root / "mine.txt").write_text("not the generator's")
    manifest = generate_synthetic_benchmark(root, size="small", seed=3)
    refs = Path(manifest["splits"]["train"]["region"]["refs"])
    stamp = refs.stat().st_mtime_ns
    assert generate_synthetic_benchmark(root, size="small", seed=3) == manifest
    assert refs.stat().st_mtime_ns == stamp  # reused, not rewritten
    refs.unlink()  # incomplete: regenerated
    assert generate_synthetic_benchmark(root, size="small", seed=3) == manifest and refs.exists()
    assert generate_synthetic_benchmark(root, size="small", seed=4)["seed"] == 4  # another seed: regenerated
    assert (root / "mine.txt").read_text() == "not the generator's"  # other files are left alone
    assert json.loads((root / "manifest.json").read_text())["seed"] == 4
    with pytest.raises(ValueError, match="Unknown size 'huge'"):
        generate_synthetic_benchmark(root, size="huge")


def test_cli_writes_the_manifest(tmp_path):
    main(["--out", str(tmp_path / "cli"), "--size", "small", "--seed", "2"])
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert (manifest["size"], manifest["seed"]) == ("small", 2)


def test_readers_load_every_part_with_the_planned_counts(splits):
    for index, split in enumerate(("train", "val", "test")):
        counts = {part: numbers[index] for part, numbers in SIZES["small"].items()}
        parts = splits[split]
        assert len(parts["temporal"]) == counts["temporal"]
        assert len(parts["region"]) == counts["region"]  # one target (one ref) per image
        assert len(parts["mask_image"]) == max(1, counts["region"] // 2)
        assert len(parts["mask_video"]) == counts["mask_video"]
        assert len(parts["conversation"]) == counts["conversation"]
        for part, dataset in parts.items():
            for row in dataset:
                validate_sample(row)
                assert row["split"] == split
        tasks = {part: set(parts[part]["task"]) for part in parts}
        assert tasks == {"temporal": {"temporal"}, "region": {"region"}, "mask_image": {"mask"},
                         "mask_video": {"mask"}, "conversation": {"text"}}


def test_region_boxes_and_masks_match_the_drawn_target(splits):
    for split in ("train", "test"):
        for box_row, mask_row in zip(splits[split]["region"], splits[split]["mask_image"]):
            assert box_row["media_path"] == mask_row["media_path"] and box_row["query"] == mask_row["query"]
            image = np.asarray(Image.open(box_row["media_path"]).convert("RGB"))
            colour, shape = box_row["query"].split()
            # PNG is lossless and the target is in front: its pixels are exactly its colour, and no
            # other pixel has that colour (other shapes have other colours, the background is grey)
            drawn = palette_distance(image, colour) == 0
            ys, xs = np.nonzero(drawn)
            assert box_row["boxes_xyxy_pixels"] == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
            assert np.array_equal(mask_from_rle(mask_row["masks_rle"][0]), drawn)
            assert box_row["image_size"] == list(image.shape[:2]) == [128, 128]
            side = box_row["boxes_xyxy_pixels"][0][2] - box_row["boxes_xyxy_pixels"][0][0]
            assert 0.2 * 128 <= side <= 0.5 * 128  # large shapes, learnable at low resolution


def test_temporal_spans_match_visibility(splits):
    for row in list(splits["train"]["temporal"]) + list(splits["test"]["temporal"]):
        assert row["duration_seconds"] == VIDEO_SECONDS
        colour = row["query"].split()[0]
        times = [(i + 0.5) / VIDEO_FPS for i in range(int(VIDEO_SECONDS * VIDEO_FPS))]
        frames = load_video(row["media_path"], timestamps_seconds=times).frames
        visible = [(palette_distance(frame, colour) < 60).sum() > 150 for frame in frames]
        expected = [any(start <= t < end for start, end in row["spans_seconds"]) for t in times]
        assert visible == expected, row["id"]
        covered = sum(end - start for start, end in row["spans_seconds"]) / VIDEO_SECONDS
        assert 0.15 <= covered <= 0.65
        clip_ids, scores = _clip_saliency([tuple(span) for span in row["spans_seconds"]])
        assert row["saliency_clip_ids"] == clip_ids and row["saliency_scores"] == scores
        overlapping = {c for c in range(8) for s, e in row["spans_seconds"] if s < 2 * c + 2 and e > 2 * c}
        assert set(row["saliency_clip_ids"]) == overlapping


def test_clip_saliency_hand_values():
    # clip 0 half visible (base 2), clip 1 fully (base 4), clip 2 half (base 2); annotators base, base-0.6,
    # base+0.4 rounded and kept in 1..4
    assert _clip_saliency([(1.0, 5.0)]) == ([0, 1, 2], [[2, 1, 2], [4, 3, 4], [2, 1, 2]])
    assert _clip_saliency([(0.25, 0.5), (14.0, 16.0)]) == ([0, 7], [[1, 1, 1], [4, 3, 4]])


def test_video_masks_follow_the_moving_target(splits):
    for row in splits["train"]["mask_video"]:
        colour, shape, _, direction = row["query"].split()
        assert row["fps"] == MASK_VIDEO_FPS and row["mask_frame_indices"] == list(range(len(row["frame_paths"])))
        centres = []
        for path, rle in zip(row["frame_paths"], row["masks_rle"]):
            frame = np.asarray(Image.open(path).convert("RGB"))
            mask = mask_from_rle(rle)
            near_colour = palette_distance(frame, colour) < 60  # JPEG: near, not exact
            assert (mask & near_colour).sum() / (mask | near_colour).sum() > 0.9, row["id"]
            ys, xs = np.nonzero(mask)
            centres.append((xs.mean(), ys.mean()))
        moved = np.array(centres[-1]) - np.array(centres[0])
        dx, dy = DIRECTIONS[direction]
        assert moved[0] * dx + moved[1] * dy >= 10, (row["id"], direction, moved)  # visibly, that way


def test_temporal_target_moves_its_way_while_visible(tmp_path):
    """Video conversations ask for the target's direction: it must show during every visible window."""
    for index in range(6):
        info = make_temporal_video(np.random.default_rng([7, index]), tmp_path / f"{index}.mp4")
        target = info["target"]
        dx, dy = DIRECTIONS[target.direction]
        for start, end in info["windows"]:
            clip = load_video(tmp_path / f"{index}.mp4", timestamps_seconds=[start + 0.01, end - 0.01])
            centres = []
            for frame in clip.frames:
                ys, xs = np.nonzero(palette_distance(frame, target.colour) < 60)
                centres.append(np.array([xs.mean(), ys.mean()]))
            moved = centres[1] - centres[0]
            expected = target.speed * (clip.metadata.timestamps_seconds[1] - clip.metadata.timestamps_seconds[0])
            assert moved[0] * dx + moved[1] * dy == pytest.approx(expected, abs=2.0), (index, target)
            assert expected >= 3.0  # at least 2 px/s over a window of at least 1.5 s


def test_shape_masks_have_the_expected_area():
    assert shape_mask("square", 64, 64, 40).sum() == 40 * 40
    assert shape_mask("circle", 64, 64, 40).sum() == pytest.approx(np.pi * 20 ** 2, rel=0.02)
    assert shape_mask("triangle", 64, 64, 40).sum() == pytest.approx(40 * 40 / 2, rel=0.05)
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", 64, 64, 40)


def _answer(row) -> str:
    reply = row["conversations"][-1]["content"]
    return row["options"]["ABCD".index(row["answer"])] if row["options"] else reply


def test_conversations_answer_the_image_and_hold_out_pairs(splits):
    held_out = {" ".join(pair) for pair in HELD_OUT_PAIRS}
    for split in ("train", "test"):
        subjects = []
        for row in splits[split]["conversation"]:
            meta = json.loads(row["meta"])
            subjects.append(meta["subject"])
            assert meta["held_out"] == (meta["subject"] in held_out)
            if row["options"]:
                assert row["answer"] in "ABCD" and row["conversations"][-1]["content"] == row["answer"]
                assert len(set(row["options"])) == len(row["options"])
            if row["media_type"] != "image":
                assert row["conversations"][0]["content"].startswith("<video>\n")
                continue
            assert row["conversations"][0]["content"].startswith("<image>\n")
            image = np.asarray(Image.open(row["media_path"]).convert("RGB"))
            present = [c for c in COLOURS if (palette_distance(image, c) == 0).sum() > 0]
            colour, shape = meta["subject"].split()
            assert colour in present
            if meta["category"] == "count":
                assert _answer(row) == ("zero", "one", "two", "three", "four")[len(present)]
            elif meta["category"] == "colour":
                assert _answer(row) == colour
            else:
                assert _answer(row) == shape
        if split == "train":
            assert not held_out & set(subjects)
        else:
            assert held_out & set(subjects)  # the test split asks about pairs never trained on
