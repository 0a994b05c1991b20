"""The synthetic benchmark: deterministic, answers that match the drawn pixels, loadable by the readers."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpo.processing.schema import empty_sample, mask_from_rle, validate_sample
from tpo.processing.synthetic import (
    COLOURS,
    DIRECTIONS,
    ORDER_GAP_SECONDS,
    HELD_OUT_PAIRS,
    MASK_VIDEO_FPS,
    MIN_VISIBLE_FRACTION,
    SIZES,
    SWAP_MAX_IOU,
    VIDEO_FPS,
    VIDEO_SECONDS,
    Sprite,
    _all_pairs,
    _clip_saliency,
    _conversations_on_video,
    _visible_travel_pixels,
    generate_synthetic_benchmark,
    load_controls,
    load_manifest,
    load_split,
    main,
    make_region_image,
    make_temporal_video,
    mcq_reply,
    multi_turn,
    shape_mask,
)
from tpo.processing.video import load_video
from tpo.training.metrics import best_gt_iou, box_iou
from tpo.training.metrics.mcqa import extract_option_letter


def refcoco_iou(a, b) -> float:
    return float(box_iou([a], [b])[0])

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
    files = {str(Path(spec[key]).relative_to(root)) for group in ("splits", "controls")
             for parts in manifest[group].values() for spec in parts.values() for key in ANNOTATION_FILES if key in spec}
    return {name: (root / name).read_bytes() for name in sorted(files)}


def palette_distance(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.abs(pixels.astype(np.int32) - np.array(COLOURS[colour])).max(axis=-1)


def test_same_seed_same_annotation_bytes(bench, tmp_path):
    again = generate_synthetic_benchmark(tmp_path / "again", size="small", seed=0)
    first, second = annotation_bytes(bench), annotation_bytes(again)
    assert len(first) == 3 + 2 + 2 + 3 * 2 + 3  # jsonl x3 (+ 2 swap), instances + refs, MeViS pair x3, conversations x3
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


def _refs_by_image(manifest: dict) -> tuple[dict, dict]:
    spec = manifest["splits"]["train"]["region"]
    instances = json.loads(Path(spec["instances"]).read_text())
    refs = json.loads(Path(spec["refs"]).read_text())
    annotations = {a["id"]: a for a in instances["annotations"]}
    by_image: dict = {}
    for ref in refs:
        by_image.setdefault((ref["image_id"], ref["split"]), []).append((ref["sentences"][0]["sent"], annotations[ref["ann_id"]]))
    objects: dict = {}
    for annotation in instances["annotations"]:
        objects.setdefault(annotation["image_id"], []).append(annotation)
    return by_image, objects


def test_readers_load_every_part_with_the_planned_counts(bench, splits):
    by_image, objects = _refs_by_image(bench)
    for index, split in enumerate(("train", "val", "test")):
        counts = {part: numbers[index] for part, numbers in SIZES["small"].items()}
        parts = splits[split]
        videos = {json.loads(row["meta"])["vid"] for row in parts["temporal"]}
        assert len(videos) == counts["temporal"]
        if split == "train":  # every object of every image and video is asked about
            assert len(parts["region"]) == sum(len(v) for (i, s), v in by_image.items() if s == "train")
            per_video: dict = {}
            for row in parts["temporal"]:
                per_video.setdefault(json.loads(row["meta"])["vid"], []).append(row)
            assert all(len(rows) == len(json.loads(rows[0]["meta"])["alternative_windows"]) for rows in per_video.values())
        else:  # one target per image and video
            assert len(parts["region"]) == counts["region"] and len(parts["temporal"]) == counts["temporal"]
        assert len(parts["mask_image"]) == min(len(parts["region"]), max(1, counts["region"] // 2))
        assert len({json.loads(r["meta"])["video"] for r in parts["mask_video"]}) == counts["mask_video"]
        images = [row for row in parts["conversation"] if row["media_type"] == "image"]
        per_image = 1 if split == "train" else 3  # colour, shape and count: one multi-turn record, or three
        assert len(images) == per_image * counts["conversation"]
        videos = {row["media_path"] for row in parts["conversation"] if row["media_type"] == "video"}
        assert 0 < len(videos) <= counts["conversation_video"]
        for part, dataset in parts.items():
            assert len(set(dataset["id"])) == len(dataset), part  # predictions are keyed by id
            for row in dataset:
                validate_sample(row)
                assert row["split"] == split
        tasks = {part: set(parts[part]["task"]) for part in parts}
        assert tasks == {"temporal": {"temporal"}, "region": {"region"}, "mask_image": {"mask"},
                         "mask_video": {"mask"}, "conversation": {"text"}}


def test_every_scene_has_distractors_that_share_the_targets_colour_or_shape(bench, splits):
    """At least two objects everywhere, three or more in most scenes, every name unique in its scene; the
    distractors share the target's shape by default (the colour word decides), or one its colour and one its
    shape with share=("colour", "shape") (only both words together name it)."""
    by_image, objects = _refs_by_image(bench)
    train_images = [names for (image, split), names in by_image.items() if split == "train"]
    counts = [len(names) for names in train_images] + [len(json.loads(r["meta"])["alternative_windows"])
                                                       for r in splits["test"]["temporal"]]
    assert min(counts) >= 2 and np.mean(np.array(counts) >= 3) >= 0.5
    for names in train_images:  # every object asked about: full names of every object of the image
        pairs = [tuple(name.split()) for name, _ in names]
        assert len(set(pairs)) == len(pairs)  # a name is unique in its image
    assert all(len(json.loads(r["meta"])["alternatives"]["boxes_xyxy_pixels"]) >= 2 for r in splits["test"]["region"])
    for seed in range(40):  # the generator's scenes: the target is object 0
        _, sprites, _ = make_region_image(np.random.default_rng(seed), _all_pairs())
        target = sprites[0]
        assert all(s.shape == target.shape and s.colour != target.colour for s in sprites[1:])
        _, sprites, _ = make_region_image(np.random.default_rng(seed), _all_pairs(), share=("colour", "shape"))
        target, others = sprites[0], sprites[1:]
        assert any(s.colour == target.colour for s in others) or any(s.shape == target.shape for s in others)
        if len(sprites) >= 3:
            assert any(s.colour == target.colour for s in others) and any(s.shape == target.shape for s in others)
    with pytest.raises(ValueError, match="size"):
        generate_synthetic_benchmark(Path(bench["root"]) / "x", size="small", share=("size",))


def test_targets_are_drawn_in_random_order_and_partly_hidden():
    on_top, hidden = [], []
    for seed in range(80):
        image, sprites, masks = make_region_image(np.random.default_rng([3, seed]), _all_pairs())
        on_top.append(sprites[0].depth == max(s.depth for s in sprites))
        full = [s.mask() for s in sprites]
        hidden.append(masks[0].sum() < full[0].sum())
        for sprite, shown, whole in zip(sprites, masks, full):  # every object mostly visible
            assert shown.sum() >= MIN_VISIBLE_FRACTION * whole.sum()
    assert 0.2 < np.mean(on_top) < 0.7  # the target is not always in front
    assert np.mean(hidden) > 0.05  # and sometimes partly hidden


def test_region_boxes_and_masks_match_the_drawn_objects(splits):
    for split in ("train", "test"):
        for box_row, mask_row in zip(splits[split]["region"], splits[split]["mask_image"]):
            assert box_row["media_path"] == mask_row["media_path"] and box_row["query"] == mask_row["query"]
            image = np.asarray(Image.open(box_row["media_path"]).convert("RGB"))
            colour, shape = box_row["query"].split()
            mask = mask_from_rle(mask_row["masks_rle"][0])
            # PNG is lossless: the visible pixels of the object are exactly its colour
            assert mask.sum() > 0 and (palette_distance(image[mask], colour) == 0).all()
            ys, xs = np.nonzero(mask)
            assert box_row["boxes_xyxy_pixels"] == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
            assert box_row["image_size"] == list(image.shape[:2]) == [128, 128]


def test_query_swap_controls_ask_about_another_visible_object(bench, splits):
    controls = load_controls(bench, "test")
    targets = {json.loads(r["meta"])["image_id"]: r for r in splits["test"]["region"]}
    assert len(controls["region_query_swap"]) >= 1
    for row in controls["region_query_swap"]:
        target = targets[json.loads(row["meta"])["image_id"]]
        assert row["media_path"] == target["media_path"] and row["query"] != target["query"]
        (a,), (b,) = target["boxes_xyxy_pixels"], row["boxes_xyxy_pixels"]
        assert refcoco_iou(a, b) <= SWAP_MAX_IOU  # different answers
        assert (b[2] - b[0]) * (b[3] - b[1]) > 0  # a visible object
    # the mask control: the same swapped queries answered with the asked object's mask, on the same images
    swapped = {json.loads(r["meta"])["image_id"]: r for r in controls["region_query_swap"]}
    assert 1 <= len(controls["mask_query_swap"]) <= len(controls["region_query_swap"])
    for row in controls["mask_query_swap"]:
        box_row, target = swapped[json.loads(row["meta"])["image_id"]], targets[json.loads(row["meta"])["image_id"]]
        assert row["task"] == "mask" and row["media_path"] == target["media_path"]
        assert row["query"] == box_row["query"] != target["query"]
        ys, xs = np.nonzero(mask_from_rle(row["masks_rle"][0]))
        assert box_row["boxes_xyxy_pixels"] == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    videos = {json.loads(r["meta"])["vid"]: r for r in splits["test"]["temporal"]}
    for row in controls["temporal_query_swap"]:
        target = videos[json.loads(row["meta"])["vid"]]
        assert row["media_path"] == target["media_path"] and row["query"] != target["query"]
        iou = best_gt_iou([row["spans_seconds"][0]], [target["spans_seconds"]])[0]
        assert iou <= SWAP_MAX_IOU + 1e-6


def test_manifest_paths_resolve_from_any_folder(bench, tmp_path):
    """The manifest stores paths relative to its folder: a copied benchmark reads from anywhere."""
    stored = json.loads((Path(bench["root"]) / "manifest.json").read_text())
    assert all(not Path(spec["jsonl"]).is_absolute() for spec in (parts["temporal"] for parts in stored["splits"].values()))
    moved = tmp_path / "moved"
    shutil.copytree(bench["root"], moved)
    manifest = load_manifest(moved / "manifest.json")
    assert manifest["splits"]["test"]["region"]["instances"] == str(moved / "refcoco" / "instances.json")
    assert len(load_split(manifest, "test", ("region",))["region"]) == SIZES["small"]["region"][2]


def test_temporal_spans_match_visibility(splits):
    """Each shape is visible exactly during its windows: a frame shows the shape's colour inside the shape's
    box only then (checked where no other shape of that colour is in view)."""
    for row in list(splits["train"]["temporal"])[:8] + list(splits["test"]["temporal"]):
        assert row["duration_seconds"] == VIDEO_SECONDS
        meta = json.loads(row["meta"])
        colour = row["query"].split()[0]
        times = [(i + 0.5) / VIDEO_FPS for i in range(int(VIDEO_SECONDS * VIDEO_FPS))]
        frames = load_video(row["media_path"], timestamps_seconds=times).frames
        others = [w for w in meta["alternative_windows"] if [list(x) for x in w] != [list(s) for s in row["spans_seconds"]]]
        for time, frame in zip(times, frames):
            expected = any(start <= time < end for start, end in row["spans_seconds"])
            others_on = sum(any(s <= time < e for s, e in w) for w in others)
            coloured = (palette_distance(frame, colour) < 60).sum()
            if expected:
                assert coloured > 150, (row["id"], time)
            elif not others_on:
                assert coloured < 20, (row["id"], time)
        clip_ids, scores = _clip_saliency([tuple(span) for span in row["spans_seconds"]])
        assert row["saliency_clip_ids"] == clip_ids and row["saliency_scores"] == scores


def test_clip_saliency_hand_values():
    # clip 0 half visible (base 2), clip 1 fully (base 4), clip 2 half (base 2); annotators base, base-0.6,
    # base+0.4 rounded and kept in 1..4
    assert _clip_saliency([(1.0, 5.0)]) == ([0, 1, 2], [[2, 1, 2], [4, 3, 4], [2, 1, 2]])
    assert _clip_saliency([(0.25, 0.5), (14.0, 16.0)]) == ([0, 7], [[1, 1, 1], [4, 3, 4]])


def test_video_masks_follow_the_moving_objects_and_twins_need_the_motion(splits):
    twins = 0
    for split in ("train", "test"):
        rows = list(splits[split]["mask_video"])
        by_video: dict = {}
        for row in rows:
            by_video.setdefault(json.loads(row["meta"])["video"], []).append(row)
            colour, shape, _, direction = row["query"].split()
            assert row["fps"] == MASK_VIDEO_FPS and row["mask_frame_indices"] == list(range(len(row["frame_paths"])))
            centres = []
            for path, rle in zip(row["frame_paths"], row["masks_rle"]):
                frame = np.asarray(Image.open(path).convert("RGB"))
                mask = mask_from_rle(rle)
                # JPEG's 4:2:0 chroma subsampling smears colour over the 1-2 px rim of a shape: most, not all
                assert mask.sum() > 0 and (palette_distance(frame[mask], colour) < 60).mean() > 0.85, row["id"]
                ys, xs = np.nonzero(mask)
                centres.append((xs.mean(), ys.mean()))
            moved = np.array(centres[-1]) - np.array(centres[0])
            dx, dy = DIRECTIONS[direction]
            assert moved[0] * dx + moved[1] * dy >= 8, (row["id"], direction, moved)  # visibly, that way
        for video_rows in by_video.values():
            names = [" ".join(r["query"].split()[:2]) for r in video_rows]
            assert len(video_rows) >= 2  # every object of the video is asked about
            for name in set(names):
                same = [r for r in video_rows if r["query"].startswith(name + " ")]
                if len(same) == 2:  # twins: the same colour and shape, opposite directions
                    twins += 1
                    assert {r["query"].split()[-1] for r in same} in ({"left", "right"}, {"up", "down"})
    assert twins >= 1


def test_temporal_shapes_move_their_way_while_visible(tmp_path):
    """Video conversations ask for a shape's direction: it must show during every visible window."""
    for index in range(4):
        info = make_temporal_video(np.random.default_rng([7, index]), tmp_path / f"{index}.mp4")
        for sprite, windows in zip(info["sprites"], info["windows"]):
            for start, end in windows:
                expected = sprite.speed * (end - start - 1 / VIDEO_FPS)
                assert expected >= 2.0  # it moves visibly while on screen
                x0, y0 = sprite.position(start)
                x1, y1 = sprite.position(end - 1 / VIDEO_FPS)
                dx, dy = DIRECTIONS[sprite.direction]
                assert (x1 - x0) * dx + (y1 - y0) * dy == pytest.approx(expected, abs=1e-3)


def test_shape_masks_have_the_expected_area():
    assert shape_mask("square", 64, 64, 40).sum() == 40 * 40
    assert shape_mask("circle", 64, 64, 40).sum() == pytest.approx(np.pi * 20 ** 2, rel=0.02)
    assert shape_mask("triangle", 64, 64, 40).sum() == pytest.approx(40 * 40 / 2, rel=0.05)
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", 64, 64, 40)


def _questions(row) -> list[dict]:
    """Each question of a conversation row (one, or several turns of a training row): its category, question,
    reply, options and letter (read from the text for the turns of a multi-turn row) and the answer it names."""
    meta, turns = json.loads(row["meta"]), row["conversations"]
    categories = meta.get("categories") or [meta["category"]]
    assert len(turns) == 2 * len(categories) and [t["role"] for t in turns] == ["user", "assistant"] * len(categories)
    out = []
    for k, category in enumerate(categories):
        question, reply = turns[2 * k]["content"], turns[2 * k + 1]["content"]
        options = [line[3:] for line in question.split("\n") if line[:3] in ("A. ", "B. ", "C. ", "D. ")]
        if len(categories) == 1:
            assert options == list(row["options"])
        answer = reply
        if options:
            letter = row["answer"] if len(categories) == 1 else reply[-2]
            answer = options["ABCD".index(letter)]
            assert len(set(options)) == 4 and reply == mcq_reply(answer, letter) == f"{answer} ({letter})"
            assert extract_option_letter(reply, options) == letter  # the metric reads the reply's letter
        placeholders = question.count("<image>") + question.count("<video>")
        assert placeholders == (k == 0) and (k > 0 or question.startswith(f"<{row['media_type']}>\n"))
        out.append({"category": category, "question": question, "options": options, "answer": answer})
    return out


def _answer(row) -> str:
    (question,) = _questions(row)
    return question["answer"]


def test_conversations_answer_the_image_and_hold_out_pairs(splits):
    held_out = {" ".join(pair) for pair in HELD_OUT_PAIRS}
    for split in ("train", "test"):
        subjects, kinds, multiple_choice = [], [], 0
        for row in splits[split]["conversation"]:
            meta = json.loads(row["meta"])
            subjects.append(meta["subject"])
            questions = _questions(row)
            # training rows ask every question of their medium (a video may have only its count), test rows one
            assert meta["category"] == ("multi_turn" if split == "train" else questions[0]["category"])
            assert len(questions) == 1 or split == "train"
            kinds += [q["category"] for q in questions]
            multiple_choice += sum(bool(q["options"]) for q in questions)
            if split == "test":
                assert meta["held_out"] == (meta["subject"] in held_out)
            if row["media_type"] != "image":
                assert {q["category"] for q in questions} <= {"count", "order", "direction"}
                continue
            assert sorted(q["category"] for q in questions) == (["colour", "count", "shape"] if split == "train" else
                                                                 [meta["category"]])
            image = np.asarray(Image.open(row["media_path"]).convert("RGB"))
            present = [c for c in COLOURS if (palette_distance(image, c) == 0).sum() > 0]
            colour, shape = meta["subject"].split()
            assert colour in present
            for question in questions:
                expected = {"count": ("zero", "one", "two", "three", "four")[len(present)], "colour": colour,
                            "shape": shape}[question["category"]]
                assert question["answer"] == expected
        counts = Counter(kinds)
        assert counts["colour"] == counts["shape"] and counts["count"] > counts["colour"]  # + the videos' counts
        assert abs(2 * multiple_choice - len(kinds)) <= len(kinds) // 4  # about half are multiple-choice
        if split == "train":
            assert not held_out & set(subjects)
        else:
            assert held_out & set(subjects)  # the test split asks about pairs never trained on


def test_video_conversations_ask_only_what_sampled_frames_show(bench, splits):
    """Order questions: the first (last) shape appears ORDER_GAP_SECONDS before (after) any other; direction
    questions: the shape travels DIRECTION_MIN_PIXELS between frames sampled every VIDEO_QUESTION_FRAME_SECONDS;
    checked against the windows of the training videos' temporal records (every shape of a training video is
    asked about)."""
    windows: dict = {}
    for row in splits["train"]["temporal"]:
        windows.setdefault(Path(row["media_path"]).name, {})[row["query"]] = [list(w) for w in row["spans_seconds"]]
    asked = Counter()
    for row in splits["train"]["conversation"]:
        if row["media_type"] != "video":
            continue
        shapes = windows[Path(row["media_path"]).name]
        for question in _questions(row):
            asked[question["category"]] += 1
            if question["category"] == "count":
                assert question["answer"] == ("zero", "one", "two", "three", "four")[len(shapes)]
            elif question["category"] == "order":
                starts = sorted((ws[0][0], name) for name, ws in shapes.items())
                first, second = (0, 1) if "first" in question["question"] else (-1, -2)
                assert abs(starts[second][0] - starts[first][0]) >= ORDER_GAP_SECONDS
                assert question["answer"] == starts[first][1]  # the object's name: shapes may all be alike
            else:
                assert question["category"] == "direction" and question["answer"] in DIRECTIONS
                assert any(name in question["question"] for name in shapes)
    assert asked["count"] >= 1
    circle = Sprite("red", "circle", 30.0, 40.0, 64.0, "right", speed=5.0)
    square = Sprite("blue", "square", 30.0, 90.0, 64.0, "up", speed=1.0)
    for gap, kinds in ((5.0, ["count", "order", "order", "direction"]), (3.0, ["count", "direction"])):
        info = {"sprites": [circle, square], "windows": [[(0.0, 6.0)], [(gap, gap + 6.0)]],
                "appearances": {"red circle": 0.0, "blue square": gap}}
        records = _conversations_on_video(np.random.default_rng(0), "train", 0, "train_00000", info)
        assert [r["category"] for r in records] == kinds
        rows = [empty_sample(options=r.get("options", []), answer=r.get("answer", ""), media_type="video",
                             meta={"category": r["category"]},
                             conversations=[{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                                            for t in r["conversations"]]) for r in records]
        answers = {r["category"]: _answer(row) for r, row in zip(records, rows)}
        assert answers["count"] == "two" and answers["direction"] == "right"  # the circle travels 5 px/s x 4 s
        orders = {("first" if "first" in r["conversations"][0]["value"] else "last"): _answer(row)
                  for r, row in zip(records, rows) if r["category"] == "order"}
        assert orders == ({"first": "red circle", "last": "blue square"} if gap == 5.0 else {})
        merged = multi_turn(np.random.default_rng(1), records)  # as a training record: every question, one video
        turns = _questions(empty_sample(media_type="video", meta={k: merged[k] for k in ("category", "categories")},
                                        conversations=[{"role": "user" if t["from"] == "human" else "assistant",
                                                        "content": t["value"]} for t in merged["conversations"]]))
        assert sorted(t["category"] for t in turns) == sorted(kinds) and merged["video"] == records[0]["video"]
    circle.speed = 3.0  # 12 px between the frames: too little to ask for its direction
    assert [r["category"] for r in _conversations_on_video(np.random.default_rng(0), "train", 0, "train_00000", info)
            ] == ["count"]
    sprite = Sprite("red", "circle", 30.0, 40.0, 64.0, "right", speed=4.0)
    # windows of 5 s show at least 2 frames 2 s apart whatever their phase; 7 s: 3 frames, 4 s apart
    assert _visible_travel_pixels(sprite, [(1.0, 6.0)]) == pytest.approx(4.0 * 2.0)
    assert _visible_travel_pixels(sprite, [(1.0, 6.0), (8.0, 15.0)]) == pytest.approx(4.0 * 4.0)
