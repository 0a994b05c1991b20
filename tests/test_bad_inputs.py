"""Bad input, one table: each row writes a malformed file or builds a malformed input, runs the part that
meets it, and states the outcome: an error that names the file, line, record, sample or flag and what to
fix (`raises`), or a logged, counted skip (`logs`), with what must not be said (`not_logged`).

Rows are grouped as in the audit (issue #15): silent wrong results (section 4), readers (section 6),
messages (section 8)."""

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from tiny_inputs import write_tiny_video

from tpo.processing.images import ImageFileError
from tpo.processing.pipeline import MediaError, encode_dataset, load_media, probe_media
from tpo.processing.readers import (
    read_activitynet_captions,
    read_charades_sta,
    read_llava_conversations,
    read_mevis,
    read_qvhighlights,
    read_reasonseg,
    read_refcoco,
)
from tpo.processing.schema import empty_sample, mask_from_rle, rle_from_mask
from tpo.processing.video import VideoLoadError, load_frame_folder, load_video, probe_video
from tpo.training.script_inputs import check_model_source, parse_json_flag, read_yaml_file


@dataclass
class Case:
    name: str
    run: Callable[[Path], object]
    raises: str | None = None  # regex of the error message
    error: type = ValueError
    logs: str | None = None  # regex of a logged warning (the run succeeds)
    not_logged: str | None = None


# ---------------------------------------------------------------------------------------------------- files
GOOD_QVH = {"qid": 1, "query": "a man cooks", "duration": 150, "vid": "v1", "relevant_windows": [[0, 10]]}


def _qvh(tmp_path: Path, *lines) -> object:
    path = tmp_path / "qvh.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return read_qvhighlights(path, tmp_path, cache_dir=str(tmp_path / "cache"))


def _charades(tmp_path: Path, data: bytes) -> object:
    path = tmp_path / "sta.txt"
    path.write_bytes(b"V1 0 2##a good line\n" + data)
    return read_charades_sta(path, tmp_path, durations={"V1": 30.0}, cache_dir=str(tmp_path / "cache"))


def _activitynet(tmp_path: Path, bad) -> object:
    path = tmp_path / "anet.json"
    path.write_text(json.dumps({"v1": {"duration": 20, "timestamps": [[0, 5]], "sentences": ["a man walks"]},
                                "v2": bad}), encoding="utf-8")
    return read_activitynet_captions(path, tmp_path, cache_dir=str(tmp_path / "cache"))


def _refcoco(tmp_path: Path, annotation: dict | None = None, image: dict | None = None, refs: list | None = None):
    good = {"id": 10, "image_id": 1, "bbox": [5, 5, 10, 8], "segmentation": [[5, 5, 15, 5, 15, 13, 5, 13]]}
    instances = {"images": [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40}, image or {"id": 2}],
                 "annotations": [good, {"id": 11, "image_id": 1, **(annotation or {})}]}
    refs = refs or [{"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "ok"}]},
                    {"ref_id": 2, "ann_id": 11, "image_id": 2 if image else 1, "split": "train",
                     "sentences": [{"sent": "bad"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    (tmp_path / "refs.json").write_text(json.dumps(refs), encoding="utf-8")
    return read_refcoco(tmp_path / "instances.json", tmp_path / "refs.json", tmp_path, tasks=("region", "mask"),
                        cache_dir=str(tmp_path / "cache"))


def _mevis_with_rle(tmp_path: Path, rle: dict) -> object:
    (tmp_path / "frames" / "v1").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "frames" / "v1" / "0.jpg")
    meta = {"videos": {"v1": {"frames": ["0"], "expressions": {"0": {"exp": "x", "anno_id": ["5"]}}}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (tmp_path / "mask_dict.json").write_text(json.dumps({"5": [rle]}), encoding="utf-8")
    return read_mevis(tmp_path / "meta.json", tmp_path / "mask_dict.json", tmp_path / "frames",
                      cache_dir=str(tmp_path / "cache"))


def _reasonseg_bomb(tmp_path: Path) -> object:
    for name in ("small", "huge"):
        Image.new("RGB", (40 if name == "huge" else 8, 40 if name == "huge" else 8)).save(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.json").write_text(json.dumps({"text": ["q"], "shapes": [
            {"label": "target", "points": [[1, 1], [5, 1], [5, 5]]}]}), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:  # a 1,600-pixel image plays a 196-Mpx one: same PIL refusal
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        return read_reasonseg(tmp_path, cache_dir=str(tmp_path / "cache"))


def _tiny_video(path: Path) -> Path:
    write_tiny_video(path, 1.0)  # 1 s at 10 fps
    return path


def _audio_only(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("aac", rate=8000)
    stream.layout = "mono"
    for index in range(4):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, index * 1024
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def _bomb_plan(tmp_path: Path) -> object:
    Image.new("RGB", (40, 40)).save(tmp_path / "huge.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        return load_media({"kind": "image", "path": str(tmp_path / "huge.png")})


# ---------------------------------------------------------------------------------------------------- model
@lru_cache(maxsize=None)
def _tiny(tasks: tuple[str, ...]):
    from transformers import LlavaForConditionalGeneration
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tpo import TPOForConditionalGeneration
    from tpo.processing.processing_tpo import TPOProcessor
    from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_sam2_config

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(tiny_llava_config(tokenizer)), tasks=list(tasks), tokenizer=tokenizer,
        sam2_config=tiny_sam2_config() if "mask" in tasks else None)
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=2)
    return model.eval(), tokenizer, processor


def _batch(task: str) -> dict:
    from tiny_inputs import SampleSpec, make_batch

    model, tokenizer, _ = _tiny(("region", "mask"))
    return make_batch(tokenizer, model.config, [SampleSpec(task=task)])


def _forward(changes: Callable[[dict], dict], task: str = "region"):
    model = _tiny(("region", "mask"))[0]
    batch = _batch(task)
    if task == "mask":
        batch.update(sam2_pixel_values=torch.zeros(1, 3, 128, 128), mask_targets=torch.zeros(1, 128, 128))
    with torch.no_grad():
        return model(**changes(batch))


def _with(name: str, value_at: Callable[[torch.Tensor], None]) -> Callable[[dict], dict]:
    def change(batch: dict) -> dict:
        value_at(batch[name])
        return batch
    return change


def _region_sample(**changes) -> dict:
    fields = dict(id="bad", task="region", media_type="image", media_path="img.png", query="the cup",
                  image_size=[32, 32], boxes_xyxy_pixels=[[1.0, 2.0, 20.0, 20.0]])
    return empty_sample(**{**fields, **changes})


def _encode(rows: list[dict]):
    return encode_dataset(Dataset.from_list(rows), _tiny(("region", "mask"))[2], load_from_cache_file=False)


SHORT_RLE = {"size": [4, 4], "counts": [3, 2]}  # 5 of 16 pixels
LONG_RLE = {"size": [4, 4], "counts": [10, 10]}  # 20 of 16 pixels


CASES = [
    # ---- section 4: silent wrong results -------------------------------------------------------------
    Case("video shorter than its annotation is a counted skip",
         lambda p: load_media({"kind": "video", "path": str(_tiny_video(p / "v.mp4")), "timestamps": [0.5, 300.0],
                               "duration": 400.0}),
         raises=r"v.mp4' lasts 1.00 s but its annotation says 400.00 s", error=MediaError),
    Case("pixel_values None with image tokens",
         lambda p: _forward(lambda b: {k: v for k, v in b.items() if k != "pixel_values"}),
         raises=r"Sample\(s\) \[0\] hold image placeholder tokens .* `pixel_values` is None"),
    Case("NaN box in a RefCOCO file", lambda p: _refcoco(p, annotation={"bbox": [1, float("nan"), 3, 4]}),
         logs=r"ref 2: skipped \(annotation without bbox: annotation 11 has bbox \[1, nan, 3, 4\]"),
    Case("NaN box given to the processor",
         lambda p: _tiny(("region", "mask"))[2].encode(_region_sample(boxes_xyxy_pixels=[[1.0, math.nan, 20.0, 20.0]])),
         raises=r"Sample 'bad': box \[1.0, nan, 20.0, 20.0\] is not finite"),
    Case("NaN box dropped by encode_dataset",
         lambda p: _encode([_region_sample(id="ok"), _region_sample(boxes_xyxy_pixels=[[math.nan, 2.0, 20.0, 20.0]])]),
         logs=r"Dropping sample 'bad': Sample 'bad': box \[nan, 2.0, 20.0, 20.0\] is not finite"),
    Case("RLE counts short of h*w in a RefCOCO file",
         lambda p: _refcoco(p, annotation={"bbox": [1, 1, 3, 3], "segmentation": {"size": [30, 40], "counts": [3, 2]}}),
         raises=r"instances.json annotation 11: RLE counts sum to 5 pixels but its size 30x40 has 1200"),
    Case("RLE counts past h*w in a MeViS mask_dict", lambda p: _mevis_with_rle(p, LONG_RLE),
         raises=r"mask_dict.json: annotation 5 frame 0: RLE counts sum to 20 pixels but its size 4x4 has 16"),
    Case("RLE counts short of h*w at decoding", lambda p: mask_from_rle(SHORT_RLE, "predictions.json record 3"),
         raises=r"predictions.json record 3: RLE counts sum to 5 pixels"),
    Case("corrupt RLE dropped by encode_dataset",
         lambda p: _encode([_region_sample(id="ok"), _region_sample(task="mask", masks_rle=[{"size": [32, 32],
                                                                                          "counts": "0"}])]),
         logs=r"Dropping sample 'bad': Sample 'bad' mask 0: RLE counts sum to 0 pixels but its size 32x32 has 1024"),
    Case("mask target other than 0/1", lambda p: _forward(_with("mask_targets", lambda t: t.fill_(0.5)), "mask"),
         raises=r"mask target of SAM2 image 0 \(sample 0\) holds the value 0.5; mask targets are binary"),
    Case("NaN mask target", lambda p: _forward(_with("mask_targets", lambda t: t.view(-1)[7].fill_(math.nan)), "mask"),
         raises=r"mask target of SAM2 image 0 \(sample 0\) holds the value nan"),
    Case("NaN SAM2 pixels", lambda p: _forward(_with("sam2_pixel_values", lambda t: t.view(-1)[3].fill_(math.nan)), "mask"),
         raises=r"SAM2 image 0 \(sample 0\) holds non-finite pixel values"),
    # ---- section 6: readers ---------------------------------------------------------------------------
    Case("empty file", lambda p: _qvh(p), raises=r"qvh.jsonl: no usable qid \(it holds none\)"),
    Case("all-invalid file", lambda p: _qvh(p, {"qid": 1}), raises=r"qvh.jsonl: no usable qid \(all 1 skipped"),
    Case("window [[5]]", lambda p: _qvh(p, GOOD_QVH, {**GOOD_QVH, "relevant_windows": [[5]]}),
         logs=r"line 2: skipped \(malformed relevant_windows \[\[5\]\]: expected \[\[start, end\], \.\.\.\]"),
    Case('window ["a", "b"]', lambda p: _qvh(p, GOOD_QVH, {**GOOD_QVH, "relevant_windows": ["a", "b"]}),
         logs=r"line 2: skipped \(malformed relevant_windows \['a', 'b'\]"),
    Case("NaN window", lambda p: _qvh(p, GOOD_QVH, b'{"qid": 2, "query": "q", "duration": 9, "vid": "v", '
                                                   b'"relevant_windows": [[1, NaN]]}'),
         logs=r"line 2: skipped \(malformed relevant_windows \[\[1, nan\]\]"),
    Case('duration "ten"', lambda p: _qvh(p, GOOD_QVH, {**GOOD_QVH, "duration": "ten"}),
         logs=r"line 2: skipped \(bad duration: 'ten' is not a number of seconds > 0\)"),
    Case("record that is a number", lambda p: _qvh(p, GOOD_QVH, 5), logs=r"line 2: skipped \(not a JSON object: 5\)"),
    Case("record that is null", lambda p: _qvh(p, GOOD_QVH, None), logs=r"line 2: skipped \(not a JSON object: null\)"),
    Case("non-UTF-8 bytes in a .jsonl", lambda p: _qvh(p, GOOD_QVH, b'{"qid": 2, "query": "caf\xe9"}'),
         raises=r"qvh.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 25\); re-save the file as UTF-8"),
    Case("duplicate qid", lambda p: _qvh(p, GOOD_QVH, GOOD_QVH), logs=r"qvh.jsonl: 1 qid id\(s\) appear more than once"),
    Case("non-UTF-8 bytes in a .txt", lambda p: _charades(p, b"V1 1 2##caf\xe9\n"),
         raises=r"sta.txt line 2: not UTF-8 text \(byte 0xe9"),
    Case("NaN times in a .txt", lambda p: _charades(p, b"V1 nan 2##q\n"),
         logs=r"line 2: skipped \(malformed times: \['nan', '2'\] are not finite numbers of seconds\)"),
    Case("clamp by float noise is not reported", lambda p: _charades(p, b"V1 1 30.0000001##q\n"),
         not_logged=r"clamped"),
    Case("clamp beyond the tolerance: one summary", lambda p: _charades(p, b"V1 1 31##q\nV1 2 32##r\n"),
         logs=r"sta.txt: clamped 2 value\(s\) by more than 0.001 \(largest 2 at line 3"),
    Case("ActivityNet record that is a number", lambda p: _activitynet(p, 5),
         logs=r"video v2: skipped \(not an object: 5"),
    Case("ActivityNet record that is null", lambda p: _activitynet(p, None),
         logs=r"video v2: skipped \(not an object: None"),
    Case('ActivityNet duration "ten"',
         lambda p: _activitynet(p, {"duration": "ten", "timestamps": [[0, 1]], "sentences": ["x"]}),
         logs=r"video v2: skipped \(bad duration: 'ten'"),
    Case("annotation without bbox", lambda p: _refcoco(p, annotation={"segmentation": []}),
         logs=r"ref 2: skipped \(annotation without bbox: annotation 11 has bbox None, expected \[x, y, w, h\]"),
    Case("image without height", lambda p: _refcoco(p, annotation={"bbox": [1, 1, 2, 2]}, image={"id": 2, "width": 9}),
         logs=r"ref 2: skipped \(image without size: image 2 has no height/width \(None, 9\)"),
    Case("polygon with 2 points",
         lambda p: _refcoco(p, annotation={"bbox": [1, 1, 2, 2], "segmentation": [[1, 1, 3, 3]]}),
         logs=r"ref 2: dropped \(polygon 0 of annotation 11 has 2 point\(s\) or non-numbers"),
    Case("ref that is null", lambda p: _refcoco(p, refs=[None, {"ref_id": 1, "ann_id": 10, "image_id": 1,
                                                               "sentences": [{"sent": "ok"}]}]),
         logs=r"ref 0: skipped \(not an object: None\)"),
    Case("conversation record that is null",
         lambda p: (p / "c.json").write_text(json.dumps([None, {"id": 1, "conversations": [
             {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])) and
         read_llava_conversations(p / "c.json", p, cache_dir=str(p / "cache")),
         logs=r"record 0: skipped \(not an object: NoneType\)"),
    Case("decompression-bomb image in a reader", _reasonseg_bomb,
         logs=r"huge.json: skipped \(unreadable image: .*huge.jpg' is too large to decode safely"),
    Case("decompression-bomb image in the collator", _bomb_plan,
         raises=r"huge.png' is too large to decode safely", error=MediaError),
    Case("decompression-bomb image in encoding",
         lambda p: Image.new("RGB", (40, 40)).save(p / "h.png") or _probe_with_limit({"media_type": "image",
                                                                                     "media_path": str(p / "h.png")}),
         raises=r"h.png' is too large to decode safely", error=ImageFileError),
    # ---- section 8: messages ----------------------------------------------------------------------------
    Case("audio-only mp4", lambda p: probe_video(_audio_only(p / "a.mp4")),
         raises=r"a.mp4' has no video stream \(audio streams: 1\)", error=VideoLoadError),
    Case("NaN timestamp", lambda p: load_video(_tiny_video(p / "v.mp4"), timestamps_seconds=[0.1, math.nan]),
         raises=r"timestamps_seconds\[1\] is nan; give finite times in seconds"),
    Case("inf timestamp", lambda p: load_video(_tiny_video(p / "v.mp4"), timestamps_seconds=[math.inf]),
         raises=r"timestamps_seconds\[0\] is inf"),
    Case("inf timestamp in a frame folder",
         lambda p: Image.new("RGB", (4, 4)).save(p / "0.jpg") or load_frame_folder([str(p / "0.jpg")], 6.0, [math.inf]),
         raises=r"timestamps_seconds\[0\] is inf"),
    Case("bad YAML names the file", lambda p: (p / "bad.yaml").write_text("a: [1,\n") and read_yaml_file(p / "bad.yaml"),
         raises=r"(?s)bad.yaml: not valid YAML \(.*line \d+, column \d+"),
    Case("missing model path", lambda p: check_model_source(str(p / "no-such-model"), "--model_name_or_path"),
         raises=r"--model_name_or_path '.*no-such-model': no such folder; give a folder written by save_pretrained",
         error=FileNotFoundError),
    Case("offline hub id without a cached copy",
         lambda p: check_model_source("no-such-org/no-such-model", "--model_name_or_path"),
         raises=r"not a local folder, and the hub is offline \(HF_HUB_OFFLINE=1\)", error=FileNotFoundError),
    Case("bad JSON in --region_head_config", lambda p: parse_json_flag("{mode: heatmap}", "--region_head_config"),
         raises=r"--region_head_config: not valid JSON"),
]


def _probe_with_limit(sample: dict):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        return probe_media(sample)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        if case.raises:
            with pytest.raises(case.error, match=case.raises):
                case.run(tmp_path)
        else:
            case.run(tmp_path)
    if case.logs:
        assert re.search(case.logs, caplog.text), caplog.text
    if case.not_logged:
        assert not re.search(case.not_logged, caplog.text), caplog.text


def test_the_table_covers_the_audit_cases():
    assert len({case.name for case in CASES}) == len(CASES)
    assert all((case.raises is None) != (case.logs is None and case.not_logged is None) for case in CASES)


def test_activitynet_query_loses_its_trailing_space(tmp_path):
    path = tmp_path / "anet.json"
    path.write_text(json.dumps({"v1": {"duration": 20, "timestamps": [[0, 5], [1, 2]],
                                       "sentences": ["a man dances .", " He sits down. "]}}), encoding="utf-8")
    rows = read_activitynet_captions(path, tmp_path, cache_dir=str(tmp_path / "cache"))
    assert [row["query"] for row in rows] == ["a man dances", "He sits down"]


def test_rle_checks_accept_every_valid_encoding():
    mask = np.zeros((5, 7), bool)
    mask[1:4, 2:6] = True
    rle = rle_from_mask(mask)
    assert np.array_equal(mask_from_rle(rle), mask)
    assert np.array_equal(mask_from_rle({"size": [5, 7], "counts": rle["counts"].encode()}), mask)
    assert np.array_equal(mask_from_rle({"size": [4, 4], "counts": [3, 2, 11]}).reshape(-1, order="F"),
                          [0, 0, 0, 1, 1] + [0] * 11)
