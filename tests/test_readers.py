"""Each reader on a small fixture written here in that dataset's exact format, malformed records included;
and the schema helpers."""

import json
import logging

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image
from tiny_inputs import write_tiny_video

from tpo.processing.readers import (
    read_activitynet_captions,
    read_charades_sta,
    read_llava_conversations,
    read_mevis,
    read_qvhighlights,
    read_reasonseg,
    read_refcoco,
    read_spec,
    read_specs,
)
from tpo.processing.schema import (
    SAMPLE_FEATURES,
    empty_sample,
    mask_from_rle,
    rle_from_mask,
    rle_from_polygons,
    validate_sample,
)


def rows_by_id(dataset) -> dict:
    return {row["id"]: row for row in dataset}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def rectangle(height, width, x0, y0, x1, y1) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------------------------
# Schema helpers
# ---------------------------------------------------------------------------------------------------
def test_empty_sample_fits_the_features_and_rejects_unknown_fields():
    sample = empty_sample(id="s1", task="region", meta={"b": 1, "a": 2})
    assert set(sample) == set(SAMPLE_FEATURES)
    assert sample["meta"] == '{"a": 2, "b": 1}'
    assert Dataset.from_list([sample], features=SAMPLE_FEATURES)[0]["id"] == "s1"
    with pytest.raises(ValueError, match="boxes"):
        empty_sample(boxes=[[0, 0, 1, 1]])


def test_rle_round_trip_and_uncompressed_counts():
    mask = rectangle(30, 40, 35, 20, 40, 30)
    rle = rle_from_mask(mask)
    assert rle["size"] == [30, 40] and isinstance(rle["counts"], str)
    assert np.array_equal(mask_from_rle(rle), mask)
    # column-major runs: 35 columns * 30 + 20 zeros, then 5 columns of 10 ones separated by 20 zeros
    counts = [1070, 10, 20, 10, 20, 10, 20, 10, 20, 10]
    assert np.array_equal(mask_from_rle({"size": [30, 40], "counts": counts}), mask)
    assert np.array_equal(mask_from_rle(rle_from_polygons([[5, 5, 15, 5, 15, 13, 5, 13]], 30, 40)),
                          rectangle(30, 40, 5, 5, 15, 13))


def test_validate_sample_names_the_sample():
    good = empty_sample(id="ok", task="region", media_type="image", image_size=[30, 40],
                        boxes_xyxy_pixels=[[1, 2, 30, 20]], masks_rle=[rle_from_mask(np.ones((30, 40), bool))])
    validate_sample(good)
    bad_cases = [
        ({"task": "caption"}, "unknown task"),
        ({"media_type": "audio"}, "unknown media_type"),
        ({"boxes_xyxy_pixels": [[5, 2, 3, 20]]}, "x0 < x1"),
        ({"boxes_xyxy_pixels": [[1, 2, 41, 20]]}, "outside"),
        ({"masks_rle": [rle_from_mask(np.ones((30, 41), bool))]}, "does not match"),
        ({"duration_seconds": 10.0, "spans_seconds": [[2.0, 12.0]]}, "outside"),
        ({"spans_seconds": [[3.0, 3.0]]}, "start < end"),
    ]
    for change, message in bad_cases:
        with pytest.raises(ValueError, match=f"'bad-1'.*{message}"):
            validate_sample({**good, "id": "bad-1", **change})


# ---------------------------------------------------------------------------------------------------
# Temporal grounding
# ---------------------------------------------------------------------------------------------------
def test_qvhighlights(tmp_path, caplog):
    path = write_jsonl(tmp_path / "highlight_val_release.jsonl", [
        {"qid": 1, "query": "A man cooks pasta.", "duration": 150, "vid": "abc_60.0_210.0",
         "relevant_windows": [[10, 14], [140, 152]], "relevant_clip_ids": [5, 6], "saliency_scores": [[1, 2, 3], [4, 4, 0]]},
        {"qid": 2, "query": "no video id", "duration": 150, "relevant_windows": [[0, 2]]},  # line 2: missing vid
        {"qid": 3, "query": "q", "duration": 150, "vid": "v3", "relevant_windows": [[0, 4]],
         "relevant_clip_ids": [0, 1], "saliency_scores": [[1, 1, 1]]},  # line 3: 2 clip ids, 1 score row
        "",
        {"qid": 5, "query": "test split", "duration": 30, "vid": "v5"},  # no annotations: kept
        {"qid": 6, "query": "backwards", "duration": 30, "vid": "v6", "relevant_windows": [[5, 3]]},  # line 6
    ])
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v5.mkv").write_bytes(b"")  # found by the second extension
    with caplog.at_level(logging.WARNING, logger="tpo.processing.readers"):
        dataset = read_qvhighlights(path, tmp_path / "videos", split="val", cache_dir=str(tmp_path / "cache"))
    rows = rows_by_id(dataset)
    assert sorted(rows) == ["qvh-1", "qvh-5"]
    first = rows["qvh-1"]
    assert first["task"] == "temporal" and first["media_type"] == "video" and first["split"] == "val"
    assert first["media_path"] == str(tmp_path / "videos" / "abc_60.0_210.0.mp4")
    assert first["query"] == "A man cooks pasta." and first["duration_seconds"] == 150.0
    assert first["spans_seconds"] == [[10.0, 14.0], [140.0, 150.0]]  # clamped to the duration
    assert first["saliency_clip_seconds"] == 2.0
    assert first["saliency_clip_ids"] == [5, 6] and first["saliency_scores"] == [[1, 2, 3], [4, 4, 0]]
    assert rows["qvh-5"]["spans_seconds"] == [] and rows["qvh-5"]["media_path"].endswith("v5.mkv")
    log = caplog.text
    assert "line 2: skipped (missing fields" in log and "line 3: skipped (saliency mismatch" in log
    assert "line 6: dropped (invalid span" in log and "line 6: skipped (no valid window" in log
    assert "line 1: span (140.0, 152.0) s clamped" in log
    assert "skipped 3 record(s)" in log and "dropped 1 part(s)" in log  # lines 2, 3, 6; the window of line 6


def test_qvhighlights_broken_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"qid": 1, "query": "q", "duration": 5, "vid": "v"}, "{not json"])
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        read_qvhighlights(path, tmp_path, cache_dir=str(tmp_path / "cache"))


def test_charades_sta(tmp_path, caplog):
    videos = tmp_path / "Charades_v1_480"
    videos.mkdir()
    write_tiny_video(videos / "Y6R7T.mp4", 3.0)  # no duration given: probed
    txt = tmp_path / "charades_sta_test.txt"
    txt.write_text(
        "AO8RW 0.0 6.9##a person is putting a book on a shelf.\n"
        "AO8RW 5.0 40.0##person opens the door\n"  # past the 30.5 s video: clamped
        "a line without the separator\n"  # line 3: skipped
        "Y6R7T 1.5 2.5##person laughs.\n"
        "ZZZZZ 1 2##no duration and no video\n"  # line 5: skipped
        "AO8RW 4.0 2.0##backwards\n",  # line 6: skipped
        encoding="utf-8")
    # Charades' own csv: quoted fields with commas; the duration is the `length` column
    csv_path = tmp_path / "Charades_v1_test.csv"
    csv_path.write_text("id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
                        'AO8RW,HR43,Kitchen,6,7,Yes,"A person, holding a book",book;shelf,"desc, with comma",c001 0 5,30.5\n',
                        encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="tpo.processing.readers"):
        dataset = read_charades_sta(txt, videos, durations=csv_path, cache_dir=str(tmp_path / "cache"))
    rows = rows_by_id(dataset)
    assert sorted(rows) == ["charades-AO8RW-1", "charades-AO8RW-2", "charades-Y6R7T-4"]
    assert rows["charades-AO8RW-1"]["query"] == "a person is putting a book on a shelf"
    assert rows["charades-AO8RW-1"]["spans_seconds"] == [[0.0, pytest.approx(6.9)]]
    assert rows["charades-AO8RW-1"]["duration_seconds"] == 30.5 and rows["charades-AO8RW-1"]["split"] == "test"
    assert rows["charades-AO8RW-2"]["spans_seconds"] == [[5.0, 30.5]]
    assert rows["charades-Y6R7T-4"]["duration_seconds"] == pytest.approx(3.0, abs=0.01)
    assert rows["charades-Y6R7T-4"]["media_path"] == str(videos / "Y6R7T.mp4")
    log = caplog.text
    assert "line 3: skipped (malformed line" in log and "line 5: skipped (unreadable video" in log
    assert "line 6: skipped (invalid span" in log and "skipped 3 record(s)" in log


def test_charades_durations_from_json_and_dict(tmp_path):
    txt = tmp_path / "sta.txt"
    txt.write_text("V1 1 2##a\n", encoding="utf-8")
    (tmp_path / "d.json").write_text('{"V1": 12.5}', encoding="utf-8")
    for durations in (tmp_path / "d.json", {"V1": 12.5}):
        row = read_charades_sta(txt, tmp_path, durations=durations, cache_dir=str(tmp_path / "cache"))[0]
        assert row["duration_seconds"] == 12.5 and row["spans_seconds"] == [[1.0, 2.0]]


def test_activitynet_captions(tmp_path, caplog):
    path = tmp_path / "val_1.json"
    path.write_text(json.dumps({
        "v_a": {"duration": 20.0, "timestamps": [[0, 5], [4, 25]], "sentences": ["A man walks.", " He sits down. "]},
        "v_b": {"duration": 10.0, "timestamps": [[0, 1]], "sentences": []},  # mismatch: skipped
    }), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="tpo.processing.readers"):
        rows = rows_by_id(read_activitynet_captions(path, tmp_path / "videos", split="val",
                                                    cache_dir=str(tmp_path / "cache")))
    assert sorted(rows) == ["anet-v_a-0", "anet-v_a-1"]
    assert rows["anet-v_a-0"]["query"] == "A man walks" and rows["anet-v_a-0"]["spans_seconds"] == [[0.0, 5.0]]
    assert rows["anet-v_a-1"]["query"] == "He sits down" and rows["anet-v_a-1"]["spans_seconds"] == [[4.0, 20.0]]
    assert "video v_b: skipped (mismatch" in caplog.text
    path.write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match="val_1.json: not valid JSON"):
        read_activitynet_captions(path, tmp_path, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------
# RefCOCO
# ---------------------------------------------------------------------------------------------------
REFS = [
    {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "train", "category_id": 1,
     "sentences": [{"sent": "left box", "raw": "Left box."}, {"sent": "small thing", "raw": "small thing"}]},
    {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 1,
     "sentences": [{"sent": "right edge", "raw": "right edge"}]},
    {"ref_id": 3, "ann_id": 12, "image_id": 1, "split": "train", "category_id": 1,  # box outside the image
     "sentences": [{"sent": "nothing", "raw": "nothing"}]},
    {"ref_id": 4, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 1,
     "sentences": [{"sent": "val ref", "raw": "val ref"}]},
    {"ref_id": 5, "ann_id": 999, "image_id": 1, "split": "train", "category_id": 1,  # unknown annotation
     "sentences": [{"sent": "ghost", "raw": "ghost"}]},
]


@pytest.fixture()
def refcoco_files(tmp_path):
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 15, 13, 5, 13]]},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [35, 20, 10, 20], "area": 50, "iscrowd": 0,
             "segmentation": {"size": [30, 40], "counts": [1070, 10, 20, 10, 20, 10, 20, 10, 20, 10]}},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [50, 40, 5, 5], "area": 25, "iscrowd": 0,
             "segmentation": [[50, 40, 55, 40, 55, 45]]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    (tmp_path / "refs.json").write_text(json.dumps(REFS), encoding="utf-8")
    return tmp_path


def test_refcoco_boxes_and_masks(refcoco_files, caplog):
    with caplog.at_level(logging.WARNING, logger="tpo.processing.readers"):
        dataset = read_refcoco(refcoco_files / "instances.json", refcoco_files / "refs.json", refcoco_files / "images",
                               split="train", tasks=("region", "mask"), cache_dir=str(refcoco_files / "cache"))
    rows = rows_by_id(dataset)
    assert sorted(rows) == ["refcoco-1-0-box", "refcoco-1-0-mask", "refcoco-1-1-box", "refcoco-1-1-mask",
                            "refcoco-2-0-box", "refcoco-2-0-mask"]
    box = rows["refcoco-1-0-box"]
    assert box["task"] == "region" and box["query"] == "left box" and box["image_size"] == [30, 40]
    assert box["boxes_xyxy_pixels"] == [[5.0, 5.0, 15.0, 13.0]]  # xywh -> xyxy
    assert box["media_path"] == str(refcoco_files / "images" / "COCO_train2014_000000000001.jpg")
    assert rows["refcoco-2-0-box"]["boxes_xyxy_pixels"] == [[35.0, 20.0, 40.0, 30.0]]  # clamped to 40x30
    polygon_mask = mask_from_rle(rows["refcoco-1-0-mask"]["masks_rle"][0])
    assert np.array_equal(polygon_mask, rectangle(30, 40, 5, 5, 15, 13))
    rle_mask = mask_from_rle(rows["refcoco-2-0-mask"]["masks_rle"][0])
    assert np.array_equal(rle_mask, rectangle(30, 40, 35, 20, 40, 30))
    log = caplog.text
    assert "clamped 1 value(s) by more than 0.001 (largest 10 at ref 2: box [35.0, 20.0, 45.0, 40.0] clamped" in log
    assert "ref 3: skipped (degenerate box" in log and "ref 5: skipped (unknown annotation 999" in log


def test_refcoco_split_filter_and_parquet_refs(refcoco_files):
    Dataset.from_list(REFS).to_parquet(str(refcoco_files / "refs.parquet"))
    from_json = read_refcoco(refcoco_files / "instances.json", refcoco_files / "refs.json", refcoco_files,
                             split="val", cache_dir=str(refcoco_files / "cache"))
    from_parquet = read_refcoco(refcoco_files / "instances.json", refcoco_files / "refs.parquet", refcoco_files,
                                split="val", cache_dir=str(refcoco_files / "cache"))
    assert [r["id"] for r in from_json] == ["refcoco-4-0-box"] and from_json[0]["query"] == "val ref"
    assert from_parquet.to_list() == from_json.to_list()


def test_refcoco_pickles_only_with_the_option_and_only_plain_data(refcoco_files):
    import pickle

    pickled = refcoco_files / "refs(unc).p"
    pickled.write_bytes(pickle.dumps(REFS, protocol=2))  # as REFER publishes them (a list of plain dicts)
    arguments = (refcoco_files / "instances.json", pickled, refcoco_files)
    with pytest.raises(ValueError, match=r"refs\(unc\).p is a Python pickle. It is read only with allow_pickle=True"):
        read_refcoco(*arguments, cache_dir=str(refcoco_files / "cache"))
    from_pickle = read_refcoco(*arguments, split="val", allow_pickle=True, cache_dir=str(refcoco_files / "cache"))
    from_json = read_refcoco(refcoco_files / "instances.json", refcoco_files / "refs.json", refcoco_files, split="val",
                             cache_dir=str(refcoco_files / "cache"))
    assert from_pickle.to_list() == from_json.to_list()
    # A pickle that would run code (os.system via REDUCE) or build any class is refused, and nothing runs.
    marker = refcoco_files / "ran"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    pickled.write_bytes(pickle.dumps([Exploit()], protocol=2))
    with pytest.raises(ValueError, match=r"refused to unpickle \(it asks for (posix|os)\.system"):
        read_refcoco(*arguments, allow_pickle=True, cache_dir=str(refcoco_files / "cache"))
    assert not marker.exists()
    from collections import OrderedDict

    pickled.write_bytes(pickle.dumps([OrderedDict(REFS[0])], protocol=2))
    with pytest.raises(ValueError, match="asks for collections.OrderedDict"):
        read_refcoco(*arguments, allow_pickle=True, cache_dir=str(refcoco_files / "cache"))


def test_refcoco_rle_of_the_wrong_size_is_an_error(refcoco_files):
    instances = json.loads((refcoco_files / "instances.json").read_text())
    instances["annotations"][1]["segmentation"] = rle_from_mask(np.ones((20, 20), bool))
    (refcoco_files / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    with pytest.raises(ValueError, match=r"instances.json annotation 11: RLE of size \[20, 20\] for a 30x40 image"):
        read_refcoco(refcoco_files / "instances.json", refcoco_files / "refs.json", refcoco_files, tasks=("mask",),
                     cache_dir=str(refcoco_files / "cache"))


# ---------------------------------------------------------------------------------------------------
# MeViS and Ref-YouTube-VOS
# ---------------------------------------------------------------------------------------------------
HEIGHT, WIDTH = 24, 32
MASK_A = [rectangle(HEIGHT, WIDTH, 0, 0, 8, 8), None, rectangle(HEIGHT, WIDTH, 2, 2, 10, 12)]
MASK_B = [rectangle(HEIGHT, WIDTH, 20, 10, 30, 20), rectangle(HEIGHT, WIDTH, 1, 1, 5, 5), None]


@pytest.fixture()
def mevis_files(tmp_path):
    frames_dir = tmp_path / "train" / "JPEGImages"
    (frames_dir / "v1").mkdir(parents=True)
    for name in ("00000", "00001", "00002"):
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(frames_dir / "v1" / f"{name}.jpg")
    meta = {"videos": {"v1": {"frames": ["00000", "00001", "00002"], "expressions": {
        "0": {"exp": " the two cats ", "anno_id": ["0", "1"], "obj_id": [0, 1]},
        "1": {"exp": "unknown object", "anno_id": ["7"], "obj_id": [7]},
    }}, "v_empty": {"frames": [], "expressions": {}}}}
    mask_dict = {"0": [None if m is None else rle_from_mask(m) for m in MASK_A],
                 "1": [None if m is None else rle_from_mask(m) for m in MASK_B]}
    (tmp_path / "train" / "meta_expressions.json").write_text(json.dumps(meta), encoding="utf-8")
    (tmp_path / "train" / "mask_dict.json").write_text(json.dumps(mask_dict), encoding="utf-8")
    return tmp_path / "train"


def test_mevis_merges_objects_per_frame(mevis_files, caplog):
    with caplog.at_level(logging.WARNING, logger="tpo.processing.readers"):
        dataset = read_mevis(mevis_files / "meta_expressions.json", mevis_files / "mask_dict.json",
                             mevis_files / "JPEGImages", fps=6.0, cache_dir=str(mevis_files / "cache"))
    assert [r["id"] for r in dataset] == ["mevis-v1-0"]
    row = dataset[0]
    assert row["task"] == "mask" and row["media_type"] == "frames" and row["query"] == "the two cats"
    assert row["frame_paths"] == [str(mevis_files / "JPEGImages" / "v1" / f"{n}.jpg") for n in ("00000", "00001", "00002")]
    assert row["fps"] == 6.0 and row["duration_seconds"] == pytest.approx(0.5) and row["image_size"] == [HEIGHT, WIDTH]
    assert row["mask_frame_indices"] == [0, 1, 2]
    expected = [MASK_A[0] | MASK_B[0], MASK_B[1], MASK_A[2]]  # a null RLE is an empty mask
    for rle, mask in zip(row["masks_rle"], expected):
        assert np.array_equal(mask_from_rle(rle), mask)
    assert "expression 1: skipped (unknown annotation ids" in caplog.text
    assert "video v_empty: skipped (no frames listed)" in caplog.text


def test_mevis_rle_of_the_wrong_size_is_an_error(mevis_files):
    mask_dict = json.loads((mevis_files / "mask_dict.json").read_text())
    mask_dict["1"][1] = rle_from_mask(np.ones((10, 10), bool))
    (mevis_files / "mask_dict.json").write_text(json.dumps(mask_dict), encoding="utf-8")
    with pytest.raises(ValueError, match=r"mask_dict.json: annotation 1 frame 1 has an RLE of size \[10, 10\]"):
        read_mevis(mevis_files / "meta_expressions.json", mevis_files / "mask_dict.json", mevis_files / "JPEGImages",
                   cache_dir=str(mevis_files / "cache"))


def test_ref_youtube_vos_palette_annotations(mevis_files):
    annotations = mevis_files / "Annotations" / "v1"
    annotations.mkdir(parents=True)
    for name, mask_1, mask_2 in (("00000", MASK_A[0], MASK_B[0]), ("00002", MASK_A[2], MASK_B[1])):
        labels = np.zeros((HEIGHT, WIDTH), np.uint8)
        labels[mask_1] = 1
        labels[mask_2] = 2
        image = Image.fromarray(labels, mode="P")
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        image.save(annotations / f"{name}.png")
    meta = {"videos": {"v1": {"frames": ["00000", "00001", "00002"],
                              "expressions": {"0": {"exp": "the green one", "obj_id": "2"}}}}}
    (mevis_files / "meta_yvos.json").write_text(json.dumps(meta), encoding="utf-8")
    row = read_mevis(mevis_files / "meta_yvos.json", None, mevis_files / "JPEGImages", dataset_name="ref_youtube_vos",
                     annotations_dir=mevis_files / "Annotations", cache_dir=str(mevis_files / "cache"))[0]
    assert row["id"] == "ref_youtube_vos-v1-0" and row["mask_frame_indices"] == [0, 2]  # 00001 is not annotated
    assert np.array_equal(mask_from_rle(row["masks_rle"][0]), MASK_B[0])
    assert np.array_equal(mask_from_rle(row["masks_rle"][1]), MASK_B[1])  # painted last: all of it is object 2


def test_mevis_without_masks(mevis_files):
    rows = read_mevis(mevis_files / "meta_expressions.json", None, mevis_files / "JPEGImages",
                      cache_dir=str(mevis_files / "cache"))
    assert [r["id"] for r in rows] == ["mevis-v1-0", "mevis-v1-1"]
    assert rows[0]["masks_rle"] == [] and rows[0]["mask_frame_indices"] == []
    # a spec may leave mask_dict out (test splits have none)
    spec = {"format": "mevis", "meta_expressions": str(mevis_files / "meta_expressions.json"),
            "frames_dir": str(mevis_files / "JPEGImages")}
    assert [r["id"] for r in read_spec(spec)] == ["mevis-v1-0", "mevis-v1-1"]


# ---------------------------------------------------------------------------------------------------
# ReasonSeg
# ---------------------------------------------------------------------------------------------------
def test_reasonseg(tmp_path, caplog):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img1.jpg")
    (tmp_path / "img1.json").write_text(json.dumps({
        "text": ["What could hold water?", "the cup"], "is_sentence": True,
        "shapes": [{"label": "target", "points": [[2, 2], [12, 2], [12, 10], [2, 10]], "shape_type": "polygon"},
                   {"label": "target", "points": [[20, 12], [26.9, 12], [26.9, 18], [20, 18]], "shape_type": "polygon"},
                   {"label": "Ignore", "points": [[0, 0], [30, 0], [30, 20]], "shape_type": "polygon"},
                   {"label": "ignore area", "points": [[4, 4], [6, 4], [6, 6], [4, 6]], "shape_type": "polygon"},
                   {"label": "flag", "points": [[0, 0], [29, 0], [29, 19], [0, 19]], "shape_type": "polygon"}],
    }), encoding="utf-8")
    (tmp_path / "img2.json").write_text(json.dumps({"text": ["x"], "shapes": []}), encoding="utf-8")  # no image
    with caplog.at_level(logging.WARNING, logger="tpo.processing.readers"):
        rows = rows_by_id(read_reasonseg(tmp_path, cache_dir=str(tmp_path / "cache")))
    assert sorted(rows) == ["reasonseg-img1-0", "reasonseg-img1-1"]
    row = rows["reasonseg-img1-0"]
    assert row["task"] == "mask" and row["media_type"] == "image" and row["image_size"] == [20, 30]
    assert row["query"] == "What could hold water?" and json.loads(row["meta"]) == {"is_sentence": True}
    # LISA: integer points (26.9 -> 26), outline + fill (both ends included), the large "Ignore" triangle
    # painted first and the smaller targets over it, the "ignore area" square inside target 1 punched out
    # of it, the "flag" shape left out.
    expected = rectangle(20, 30, 2, 2, 13, 11) | rectangle(20, 30, 20, 12, 27, 19)
    expected[4:7, 4:7] = False
    assert np.array_equal(mask_from_rle(row["masks_rle"][0]), expected)
    assert "img2.json: skipped (no image next to it" in caplog.text


def test_reasonseg_image_size_after_exif_orientation(tmp_path):
    image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))  # 30 wide, 20 high on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: shown 20 wide, 30 high
    image.save(tmp_path / "img.jpg", exif=exif)
    (tmp_path / "img.json").write_text(json.dumps({"text": ["q"], "shapes": [
        {"label": "target", "points": [[1, 1], [5, 1], [5, 25], [1, 25]]}]}), encoding="utf-8")
    row = read_reasonseg(tmp_path, cache_dir=str(tmp_path / "cache"))[0]
    assert row["image_size"] == [30, 20]
    assert np.array_equal(mask_from_rle(row["masks_rle"][0]), rectangle(30, 20, 1, 1, 6, 26))


# ---------------------------------------------------------------------------------------------------
# LLaVA-style conversations
# ---------------------------------------------------------------------------------------------------
def test_llava_conversations(tmp_path, caplog):
    human = {"from": "human", "value": "<image>\nWhat is this?"}
    gpt = {"from": "gpt", "value": "A cat."}
    records = [
        {"id": "a", "image": "coco/1.jpg", "conversations": [human, gpt]},
        {"id": "b", "video": "clips/1.mp4", "category": "mcq", "options": ["cat", "dog"], "answer": "B",
         "conversations": [{"from": "human", "value": "<video>\nWhich animal?\nA. cat\nB. dog"}, {"from": "gpt", "value": "B"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                      {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye"}]},
        {"id": "d", "conversations": [gpt, human]},  # starts with the model: skipped
        {"id": "e", "image": ["1.jpg", "2.jpg"], "conversations": [human, gpt]},  # multi-image: skipped
        {"id": "f", "conversations": [{"from": "human"}, gpt]},  # a turn without a value: skipped
        {"id": "g", "image": ["only.jpg"], "conversations": [human, gpt]},  # a one-element list is fine
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="tpo.processing.readers"):
        rows = rows_by_id(read_llava_conversations(path, tmp_path / "media", fps=2.0, cache_dir=str(tmp_path / "cache")))
    assert sorted(rows) == ["llava-a", "llava-b", "llava-c", "llava-g"]
    image = rows["llava-a"]
    assert image["task"] == "text" and image["media_type"] == "image" and image["query"] == ""
    assert image["media_path"] == str(tmp_path / "media" / "coco" / "1.jpg") and image["fps"] == 0.0
    assert image["conversations"] == [{"role": "user", "content": "<image>\nWhat is this?"},
                                      {"role": "assistant", "content": "A cat."}]
    video = rows["llava-b"]
    assert video["media_type"] == "video" and video["fps"] == 2.0
    assert video["options"] == ["cat", "dog"] and video["answer"] == "B" and json.loads(video["meta"]) == {"category": "mcq"}
    text = rows["llava-c"]
    assert text["media_type"] == "none" and text["media_path"] == "" and len(text["conversations"]) == 4
    assert rows["llava-g"]["media_path"] == str(tmp_path / "media" / "only.jpg")
    log = caplog.text
    assert "record 3 (id d): skipped (bad roles" in log and "record 4 (id e): skipped (unsupported media" in log
    assert "record 5 (id f): skipped (bad turns" in log and "skipped 3 record(s)" in log


# ---------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------
def test_read_spec_checks_keys_and_limits(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"qid": i, "query": "q", "duration": 10, "vid": f"v{i}",
                                               "relevant_windows": [[1, 2]]} for i in range(5)])
    spec = {"format": "qvhighlights", "jsonl": str(path), "video_dir": str(tmp_path), "max_samples": 3}
    assert [r["id"] for r in read_spec(spec)] == ["qvh-0", "qvh-1", "qvh-2"]
    assert len(read_specs([spec, {**spec, "max_samples": 2}])) == 5
    assert len(read_specs([])) == 0 and read_specs([]).features == SAMPLE_FEATURES
    with pytest.raises(ValueError, match="Unknown dataset format 'qvh'"):
        read_spec({**spec, "format": "qvh"})
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['videos'\]"):
        read_spec({**spec, "videos": "x"})
