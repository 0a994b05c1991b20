"""examples/evaluate_tpo.py predict: a saved tiny TPO checkpoint over the small synthetic benchmark, the files
it writes (one record per sample, right ids, values in range), and the round trip predict -> evaluate."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tpo import TPOForConditionalGeneration
from tpo.processing.processing_tpo import TPOProcessor
from tpo.processing.readers import read_spec
from tpo.processing.synthetic import MASK_VIDEO_FRAMES, VIDEO_SECONDS, generate_synthetic_benchmark
from tpo.training.benchmark_scoring import read_records
from tpo.training.metrics import as_mask, mask_iou_metrics
from tpo.training.predict import read_data_specs
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_sam2_config
from tpo.visualization import PRED_COLORS

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "evaluate_tpo.py"
IMAGE_SIZE = 128  # the synthetic benchmark's images and frames
PROCESSOR_MASK_FRAMES = 2  # video mask frames the saved processor gives SAM2 (predict uses all by default)


def _tiny_tpo(tokenizer):
    torch.manual_seed(0)
    config = tiny_llava_config(tokenizer)
    config.vision_config.vision_use_head = False
    return TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(config), tasks=["temporal", "region", "mask"], tokenizer=tokenizer,
        sam2_config=tiny_sam2_config(64), temporal_head_config={"d_model": 32, "num_heads": 2, "dim_feedforward": 64,
                                                                "num_encoder_layers": 1, "num_decoder_layers": 1})


def _processor(model, tokenizer):
    return TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                          tokenizer, num_frames=4, mask_frames_per_video=PROCESSOR_MASK_FRAMES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved checkpoint (model + processor) and the small synthetic benchmark."""
    root = tmp_path_factory.mktemp("predict")
    tokenizer = build_tiny_tokenizer()
    model = _tiny_tpo(tokenizer)
    checkpoint = root / "final"
    model.save_pretrained(checkpoint)
    _processor(model, tokenizer).save_pretrained(checkpoint)
    manifest = generate_synthetic_benchmark(root / "synthetic", size="small", seed=0)
    return {"root": root, "checkpoint": str(checkpoint), "manifest": manifest,
            "manifest_path": str(root / "synthetic" / "manifest.json"), "test": manifest["splits"]["test"]}


@pytest.fixture(scope="module")
def predicted(cli, world):
    """One full predict run on the test split (defaults: every frame of video masks), metrics, one PNG per task."""
    output = world["root"] / "out"
    summary = cli.main(["predict", "--model", world["checkpoint"], "--data", world["manifest_path"], "--split", "test",
                        "--output-dir", str(output), "--batch-size", "4", "--device", "cpu", "--evaluate",
                        "--visualize", "1"])
    files = {(f["source"], f["task"]): f for f in summary["files"]}
    return summary, files, output


def _ids(spec: dict) -> list[str]:
    return read_spec(spec)["id"]


def test_one_file_per_dataset_and_task_with_a_command(predicted):
    summary, files, output = predicted
    assert set(files) == {("qvhighlights", "temporal"), ("synthetic_refcoco", "region"), ("synthetic_refcoco", "mask"),
                          ("synthetic_mevis", "mask"), ("llava", "text")}
    assert {Path(f["path"]).name for f in files.values()} == {
        "qvhighlights_test_submission.jsonl", "synthetic_refcoco_test_boxes.json", "synthetic_refcoco_test_masks.json",
        "synthetic_mevis_test_masks.json", "llava_test_answers.json"}
    assert summary["predicted"] == summary["samples"] == summary["annotated"] == sum(f["records"] for f in files.values())
    assert all(f["evaluate"] and f["evaluate"][0] == f["benchmark"] for f in files.values())
    assert json.loads((output / "predict_summary.json").read_text())["files"] == summary["files"]


def test_qvhighlights_submission_records(world, predicted):
    _, files, _ = predicted
    rows = read_records(files[("qvhighlights", "temporal")]["path"])
    gt = read_records(world["test"]["temporal"]["jsonl"])
    assert [r["qid"] for r in rows] == [g["qid"] for g in gt]  # the original qids, in order, once each
    for row in rows:
        windows = np.array(row["pred_relevant_windows"])
        assert windows.shape[1] == 3 and len(windows) >= 1
        assert (windows[:, 0] >= 0).all() and (windows[:, 1] <= VIDEO_SECONDS + 1e-6).all()
        assert (windows[:, 0] <= windows[:, 1]).all()
        assert (np.diff(windows[:, 2]) <= 0).all()  # sorted by descending score: the first is the top-1
        assert len(row["pred_saliency_scores"]) == math.ceil(VIDEO_SECONDS / 2)  # one per 2-second clip


def test_box_records_are_coco_boxes_inside_the_image(world, predicted):
    _, files, _ = predicted
    rows = read_records(files[("synthetic_refcoco", "region")]["path"])
    assert [r["id"] for r in rows] == _ids(world["test"]["region"])
    for row in rows:
        x, y, w, h = row["bbox"]
        assert row["bbox_xyxy"] == pytest.approx([x, y, x + w, y + h])
        assert 0 <= x <= x + w <= IMAGE_SIZE and 0 <= y <= y + h <= IMAGE_SIZE
        assert isinstance(row["image_id"], int)


def test_mask_records(world, predicted):
    _, files, _ = predicted
    image_rows = read_records(files[("synthetic_refcoco", "mask")]["path"])
    assert [r["id"] for r in image_rows] == _ids(world["test"]["mask_image"])
    assert all(as_mask(r["mask"]).shape == (IMAGE_SIZE, IMAGE_SIZE) for r in image_rows)
    video_rows = read_records(files[("synthetic_mevis", "mask")]["path"])
    meta = json.loads(Path(world["test"]["mask_video"]["meta_expressions"]).read_text())
    expected = [(video, expression) for video, v in meta["videos"].items() for expression in v["expressions"]]
    assert [(r["video_id"], r["exp_id"]) for r in video_rows] == expected
    assert [r["id"] for r in video_rows] == [f"synthetic_mevis-{v}-{e}" for v, e in expected]
    for row in video_rows:  # by default every annotated frame is segmented (the processor's 2 are not the limit)
        assert len(row["masks"]) == MASK_VIDEO_FRAMES
        assert all(m is not None and as_mask(m).shape == (IMAGE_SIZE, IMAGE_SIZE) for m in row["masks"])


def test_answer_records_use_the_conversation_ids(world, predicted):
    _, files, _ = predicted
    rows = read_records(files[("llava", "text")]["path"])
    original = json.loads(Path(world["test"]["conversation"]["json"]).read_text())
    assert [r["id"] for r in rows] == [r["id"] for r in original]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_round_trip_through_the_evaluate_subcommands(cli, world, predicted):
    summary, files, output = predicted
    test, task_metrics = world["test"], summary["metrics"]
    assert json.loads((output / "metrics.json").read_text()) == pytest.approx(task_metrics)

    qvh = cli.main(["qvhighlights", "--predictions", files[("qvhighlights", "temporal")]["path"],
                    "--ground-truth", test["temporal"]["jsonl"]])["brief"]
    assert {"MR-full-mAP", "MR-full-R1@0.5", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"} <= set(qvh)
    assert qvh["MR-full-mAP"] / 100 == pytest.approx(task_metrics["temporal/mAP"])
    assert qvh["HL-min-VeryGood-mAP"] / 100 == pytest.approx(task_metrics["highlight/map"])

    region = test["region"]
    boxes = cli.main(["refcoco", "--predictions", files[("synthetic_refcoco", "region")]["path"], "--instances",
                      region["instances"], "--refs", region["refs"], "--split", "test", "--dataset-name", "synthetic_refcoco"])
    assert set(boxes) == {"Acc@0.5", "mIoU"}
    assert boxes["mIoU"] / 100 == pytest.approx(task_metrics["region/miou"])
    assert boxes["Acc@0.5"] / 100 == pytest.approx(task_metrics["region/acc@0.5"])

    # Image masks against the masks the reader gives (polygons / RLE of the instances file), computed here.
    masks_file = files[("synthetic_refcoco", "mask")]
    masks = cli.main(["reasonseg", "--predictions", masks_file["path"], "--ground-truth", masks_file["ground_truth"]])
    truth = {row["id"]: row["masks_rle"][0] for row in read_spec(test["mask_image"])}
    predictions = {r["id"]: r["mask"] for r in read_records(masks_file["path"])}
    assert masks == pytest.approx(mask_iou_metrics([predictions[k] for k in truth], list(truth.values())))

    mevis = cli.main(["mevis", "--predictions", files[("synthetic_mevis", "mask")]["path"], "--meta",
                      test["mask_video"]["meta_expressions"], "--mask-dict", test["mask_video"]["mask_dict"],
                      "--dataset-name", "synthetic_mevis"])
    assert set(mevis) == {"J", "F", "J&F"} and all(0 <= v <= 100 for v in mevis.values())
    # Every frame was segmented, so the benchmark's J&F and the task metric see the same frames.
    assert mevis["J&F"] / 100 == pytest.approx(task_metrics["mask/j&f"])

    answers = cli.main(["mcqa", "--predictions", files[("llava", "text")]["path"],
                        "--ground-truth", test["conversation"]["json"]])
    assert {"accuracy", "unparsed"} <= set(answers)
    assert answers["accuracy"] / 100 == pytest.approx(task_metrics["mcqa/accuracy"])

    # The command lines of the summary give the same numbers.
    assert cli.main(files[("synthetic_refcoco", "region")]["evaluate"]) == pytest.approx(boxes)
    assert cli.main(files[("qvhighlights", "temporal")]["evaluate"])["brief"] == pytest.approx(qvh, nan_ok=True)


def test_visualizations_one_per_task(predicted):
    summary, files, output = predicted
    written = [Path(p) for p in summary["visualizations"]]
    assert sorted(p.parent.name for p in written) == ["mask", "region", "temporal"]
    box_png = next(p for p in written if p.parent.name == "region")
    assert box_png.name == f"{json.loads(Path(files[('synthetic_refcoco', 'region')]['path']).read_text())[0]['id']}.png"
    with Image.open(box_png) as image:
        assert image.format == "PNG" and image.width >= IMAGE_SIZE
        picture = np.asarray(image.convert("RGB"))[:IMAGE_SIZE, :IMAGE_SIZE]
    assert (picture == PRED_COLORS[0]).all(axis=-1).any()  # the predicted box is drawn on the image
    assert all(p.with_suffix(".json").exists() for p in written)


def test_max_samples_mask_frames_and_partial_qvhighlights(cli, world, tmp_path):
    summary = cli.main(["predict", "--model", world["checkpoint"], "--data", world["manifest_path"], "--output-dir",
                        str(tmp_path), "--max-samples", "1", "--mask-frames-per-video", "2", "--device", "cpu"])
    files = {(f["source"], f["task"]): f for f in summary["files"]}
    assert all(f["records"] == 1 for f in files.values()) and "metrics" not in summary
    video = read_records(files[("synthetic_mevis", "mask")]["path"])[0]["masks"]
    # 2 frames of 8, evenly spaced (the first and the last), at their frame index; the others null.
    assert [m is not None for m in video] == [True] + [False] * (MASK_VIDEO_FRAMES - 2) + [True]
    temporal = files[("qvhighlights", "temporal")]
    assert temporal["evaluate"][-2:] == ["--on-missing", "drop"]
    assert cli.main(temporal["evaluate"])["brief"]["MR-full-mAP"] >= 0
    with pytest.raises(ValueError, match="without prediction"):  # the official default refuses missing qids
        cli.main(temporal["evaluate"][:-2])


def test_samples_without_annotations_are_predicted(cli, world, tmp_path):
    """A QVHighlights test-style jsonl (no windows) and MeViS without mask_dict, from a YAML list of specs."""
    test = world["test"]
    queries = tmp_path / "highlight_test.jsonl"
    queries.write_text("".join(json.dumps({"qid": 900 + i, "query": "the red circle", "duration": VIDEO_SECONDS,
                                           "vid": f"test_{i:05d}"}) + "\n" for i in range(2)))
    video_dir = test["temporal"]["video_dir"]
    # MeViS valid-style: no mask_dict (read_mevis takes `mask_dict_json` without a default, hence the null).
    mevis = {**{k: test["mask_video"][k] for k in ("meta_expressions", "frames_dir", "fps")}, "mask_dict": None}
    data = tmp_path / "data.yaml"
    data.write_text(f"- {{format: qvhighlights, jsonl: '{queries}', video_dir: '{video_dir}', split: test}}\n"
                    f"- {json.dumps({'format': 'mevis', 'split': 'valid', 'dataset_name': 'mevis_valid', **mevis})}\n")
    summary = cli.main(["predict", "--model", world["checkpoint"], "--data", str(data), "--output-dir", str(tmp_path / "o"),
                        "--evaluate", "--max-samples", "1", "--mask-frames-per-video", "3", "--device", "cpu"])
    files = {f["source"]: f for f in summary["files"]}
    assert summary["annotated"] == 0 and summary["predicted"] == summary["samples"] == 2
    assert all(f["evaluate"] is None and "no annotations" in f["note"] for f in files.values())
    rows = read_records(files["qvhighlights"]["path"])
    assert [r["qid"] for r in rows] == [900]
    assert all(0 <= w[0] <= w[1] <= VIDEO_SECONDS for r in rows for w in r["pred_relevant_windows"])
    (video,) = read_records(files["mevis_valid"]["path"])
    assert video["id"] == "mevis_valid-test_00000-0" and len(video["masks"]) == MASK_VIDEO_FRAMES
    # Unannotated: every frame is a candidate; 3 of 8 evenly spaced (0, 4, 7) are segmented.
    assert [i for i, m in enumerate(video["masks"]) if m is not None] == [0, 4, 7]
    assert not any(k.startswith(("temporal/", "mask/")) for k in summary["metrics"])  # nothing annotated to score


def test_a_plain_llava_checkpoint_is_refused(cli, world, tmp_path):
    llava = tmp_path / "llava"
    LlavaForConditionalGeneration(tiny_llava_config(build_tiny_tokenizer())).save_pretrained(llava)
    args = ["predict", "--data", world["manifest_path"], "--output-dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=rf"{llava} is a 'llava' checkpoint, not a TPO model.*from_mllm"):
        cli.main(args + ["--model", str(llava)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path / 'empty'}: no config.json"):
        cli.main(args + ["--model", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="nowhere: no such model folder"):
        cli.main(args + ["--model", str(tmp_path / "nowhere")])
    assert not (tmp_path / "o").exists()


def test_a_processor_with_other_task_token_ids_is_refused(cli, world, tmp_path):
    tokenizer = build_tiny_tokenizer(["a much smaller corpus of words"], vocab_size=400)
    other = tmp_path / "other_processor"
    _processor(_tiny_tpo(tokenizer), tokenizer).save_pretrained(other)
    with pytest.raises(ValueError, match=r"does not match the model .*differ from the model's"):
        cli.main(["predict", "--model", world["checkpoint"], "--processor", str(other), "--data", world["manifest_path"],
                  "--output-dir", str(tmp_path / "o")])


def test_data_file_errors(world, tmp_path):
    with pytest.raises(ValueError, match=r"no split 'eval'; the file has \['test', 'train', 'val'\]"):
        read_data_specs(world["manifest_path"], "eval")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {jsonl: x.jsonl}\n")
    with pytest.raises(ValueError, match="expected reader specs"):
        read_data_specs(str(bad))
    single = tmp_path / "one.json"
    single.write_text(json.dumps(world["test"]["region"]))
    assert read_data_specs(str(single)) == [world["test"]["region"]]


def _readme_command(marker: str) -> list[str]:
    """The README's shell command that follows the comment line containing `marker` (continuations joined)."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line) + 1
    command = ""
    for line in lines[start:]:
        command += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            break
    return shlex.split(command)


@pytest.mark.slow
def test_the_readmes_predict_command_runs_as_written(tmp_path):
    """The README's `predict` command, word for word, in a folder laid out as the default run leaves it (its
    checkpoint has the mask head's box prompt, as the default's does), with video masks tracked through SAM2's
    memory (the command's default mode)."""
    command = _readme_command("# run a checkpoint over a dataset")
    assert command[:3] == ["python", "examples/evaluate_tpo.py", "predict"]
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_llava_config(tokenizer)
    config.vision_config.vision_use_head = False
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(config), tasks=["temporal", "region", "mask"], tokenizer=tokenizer,
        sam2_config=tiny_sam2_config(64), mask_head_config={"box_prompt": True, "box_prompt_config": {"heatmap_dim": 16}},
        temporal_head_config={"d_model": 32, "num_heads": 2, "dim_feedforward": 64, "num_encoder_layers": 1,
                              "num_decoder_layers": 1})
    model.save_pretrained(tmp_path / "outputs" / "tpo-default" / "final")
    _processor(model, tokenizer).save_pretrained(tmp_path / "outputs" / "tpo-default" / "final")
    generate_synthetic_benchmark(tmp_path / ".cache" / "tpo" / "synthetic", size="small", seed=0, workers=1)
    (tmp_path / "examples").symlink_to(SCRIPT.parent)
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "outputs" / "predictions" / "metrics.json").read_text())
    assert {"region/acc@0.5", "temporal/r1@0.5", "mask/j&f", "floor/region_query_blind_acc@0.5"} <= set(metrics)
    assert {p.parent.name for p in (tmp_path / "outputs" / "predictions" / "visualizations").glob("*/*.png")} == {
        "mask", "region", "temporal"}  # --visualize 4


def test_predict_scores_as_the_training_runs_evaluation_does(cli, world, tmp_path):
    """`predict --evaluate` and run_tpo's TaskEvaluator give the same numbers on the same checkpoint and split:
    one definition of each metric, every annotated mask frame in both."""
    from transformers import AutoModel, AutoProcessor

    from tpo.processing.synthetic import load_split
    from tpo.training.evaluation import TaskEvaluator

    summary = cli.main(["predict", "--model", world["checkpoint"], "--data", world["manifest_path"], "--split", "test",
                        "--output-dir", str(tmp_path), "--batch-size", "4", "--device", "cpu", "--evaluate",
                        "--mask-video-mode", "per_frame"])
    model = AutoModel.from_pretrained(world["checkpoint"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(world["checkpoint"], trust_remote_code=True)
    parts = load_split(world["manifest"], "test")
    samples = [row for part in ("temporal", "region", "mask_image", "mask_video", "conversation") for row in parts[part]]
    metrics = TaskEvaluator(processor, samples, batch_size=4, mask_video_mode="per_frame")(model)
    for key in ("region/acc@0.5", "region/miou", "temporal/r1@0.5", "temporal/miou", "mask/miou", "mask/ciou",
                "mask/j&f", "mask/j&f_first_frame", "floor/mask_query_blind_miou"):
        # the two runs batch the samples alike but in processes with other memory layouts: float32 rounding
        # (see test_remote_code) may move a metric by a pixel or a rank, hence the tolerance
        assert summary["metrics"][key] == pytest.approx(metrics[key], abs=2e-3), key
