"""`evaluate_tpo.py predict` over multiple-choice benchmarks (MVBench, Video-MME, MLVU, a generic file) and tracking
benchmarks (LaSOT, GOT-10k val and test layouts) with a saved tiny checkpoint whose mask head has the box prompt:
the files written, the accuracies they give, the same numbers from the scoring subcommands; and the answer
prefix and answer reading with a scripted `generate`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_inputs import write_got10k, write_lasot, write_tiny_video
from transformers import LlavaForConditionalGeneration
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tpo import TPOForConditionalGeneration
from tpo.processing.processing_tpo import TPOProcessor
from tpo.processing.readers import read_spec
from tpo.training.multiple_choice import answer_choices
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_sam2_config



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(tiny_llava_config(tokenizer)), tasks=["region", "mask"], tokenizer=tokenizer,
        sam2_config=tiny_sam2_config(64), mask_head_config={"box_prompt": True, "box_prompt_config": {"heatmap_dim": 16}})
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=4)
    folder = tmp_path_factory.mktemp("checkpoint") / "final"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {"path": str(folder), "model": model.eval(), "processor": processor}


def _json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    mvbench = root / "MVBench"
    (mvbench / "video" / "star" / "Charades_v1_480").mkdir(parents=True)
    write_tiny_video(mvbench / "video" / "star" / "Charades_v1_480" / "ZS9XR.mp4", 4.0)
    _json(mvbench / "json" / "action_sequence.json", [
        {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket."], "answer": "Tidied up the blanket.",
         "start": 1.0, "end": 3.0},
        {"video": "missing.mp4", "question": "What then?", "candidates": ["Sat.", "Stood."], "answer": "Sat.",
         "start": 0.0, "end": 1.0}])
    frames = mvbench / "video" / "tvqa" / "frames_fps3_hq" / "clip_00"
    frames.mkdir(parents=True)
    for index in range(1, 10):
        Image.fromarray(np.full((32, 32, 3), 20 * index, np.uint8)).save(frames / f"{index:05d}.jpg")
    _json(mvbench / "json" / "episodic_reasoning.json", [
        {"video": "clip_00", "question": "Who speaks?", "candidates": ["Castle", "Beckett", "Ryan"], "answer": "Ryan",
         "start": 0.5, "end": 2.5}])
    (root / "videomme" / "data").mkdir(parents=True)
    write_tiny_video(root / "videomme" / "data" / "fFjv93ACGo8.mp4", 2.0)
    videomme = _json(root / "videomme" / "questions.json", [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
         "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
         "question": "How many planets?", "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "B"}])
    (root / "MLVU" / "video" / "1_plotQA").mkdir(parents=True)
    write_tiny_video(root / "MLVU" / "video" / "1_plotQA" / "movie101_66.mp4", 2.0)
    _json(root / "MLVU" / "json" / "1_plotQA.json", [
        {"video": "movie101_66.mp4", "duration": 2, "question": "What color?", "candidates": ["Yellow", "Red"],
         "answer": "Yellow", "question_type": "plotQA"}])
    write_lasot(root / "LaSOT", "airplane-1", count=6)
    write_lasot(root / "LaSOT", "bird-3", count=5, occluded=(4,))
    write_got10k(root / "GOT-10k" / "val", count=5)
    write_got10k(root / "GOT-10k" / "test", "GOT-10k_Test_000001", count=4, first_only=True)
    specs = [
        {"format": "mvbench", "root": str(mvbench), "tasks": ["action_sequence", "episodic_reasoning"]},
        {"format": "videomme", "annotations": videomme, "video_dir": str(root / "videomme" / "data"),
         "convention": "lmms_eval"},
        {"format": "mlvu", "root": str(root / "MLVU"), "tasks": ["plotQA"]},
        {"format": "lasot", "root": str(root / "LaSOT")},
        {"format": "got10k", "root": str(root / "GOT-10k" / "val"), "split": "val"},
        {"format": "got10k", "root": str(root / "GOT-10k" / "test"), "dataset_name": "got10k_test"},
    ]
    path, small = root / "benchmarks.yaml", root / "small.yaml"
    path.write_text("\n".join(f"- {json.dumps(spec)}" for spec in specs) + "\n")
    small.write_text("\n".join(f"- {json.dumps(spec)}" for spec in specs[0:4:3]) + "\n")  # MVBench and LaSOT
    return {"root": root, "path": str(path), "small": str(small), "specs": specs}


@pytest.fixture(scope="module")
def predicted(cli, checkpoint, data):
    output = data["root"] / "out"
    summary = cli.main(["predict", "--model", checkpoint["path"], "--data", data["path"], "--output-dir", str(output),
                        "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu", "--evaluate"])
    return summary, {(f["source"], f["split"]): f for f in summary["files"]}, output


def test_multiple_choice_files_and_accuracies(cli, predicted):
    summary, files, output = predicted
    mvbench = files[("mvbench", "test")]
    answers = json.loads(Path(mvbench["path"]).read_text())
    assert [a["id"] for a in answers] == ["mvbench-action_sequence-0", "mvbench-action_sequence-1",
                                        "mvbench-episodic_reasoning-0"]
    assert "missing.mp4" in answers[1]["error"] and answers[1]["prediction"] == ""  # unreadable media: unanswered
    accuracy = json.loads(Path(mvbench["accuracy_file"]).read_text())
    assert accuracy["questions"] == 3 and accuracy["media_errors"] == 1 and accuracy["unanswered"] >= 1
    correct = [a["prediction"] == t for a, t in zip(answers, ["B", "A", "C"])]
    assert accuracy["accuracy"] == pytest.approx(100 * np.mean(correct))
    assert accuracy["task_type/episodic_reasoning"] == pytest.approx(100.0 * correct[2])
    # the scoring subcommand reads the files back to the same accuracy
    again = cli.main(mvbench["evaluate"])
    assert again["accuracy"] == pytest.approx(accuracy["accuracy"])
    assert summary["metrics"]["mvbench/accuracy"] == pytest.approx(accuracy["accuracy"] / 100)
    videomme = json.loads(Path(files[("videomme", "test")]["accuracy_file"]).read_text())
    assert videomme["questions"] == 1 and {"category/Knowledge", "duration_class/short"} <= set(videomme)
    mlvu = json.loads(Path(files[("mlvu", "dev")]["path"]).read_text())
    assert [a["id"] for a in mlvu] == ["mlvu-plotQA-0"] and mlvu[0]["task_type"] == "plotQA"
    assert json.loads((output / "predict_summary.json").read_text())["files"] == summary["files"]


def test_tracking_files_are_the_toolkits_and_are_scored(cli, predicted, data):
    summary, files, output = predicted
    lasot = files[("lasot", "test")]
    folder = Path(lasot["path"])
    for name, count in (("airplane-1", 6), ("bird-3", 5)):
        boxes = np.loadtxt(folder / f"{name}.txt", delimiter=",")
        assert boxes.shape == (count, 4) and boxes[0].tolist() == [4, 10, 16, 20]
        assert np.loadtxt(folder / f"{name}_time.txt").shape == (count,)
    assert lasot["evaluate"][:2] == ["tracking", "--predictions"] and lasot["evaluate"][-1] == "lasot"
    scored = cli.main(lasot["evaluate"])
    assert summary["metrics"]["lasot/success_auc"] == pytest.approx(scored["success_auc"] / 100)
    assert 0 <= scored["success_auc"] <= 100
    val = files[("got10k", "val")]
    assert (Path(val["path"]) / "GOT-10k_Val_000001" / "GOT-10k_Val_000001_001.txt").exists()
    assert "got10k/AO" in summary["metrics"]
    test = files[("got10k_test", "test")]
    assert test["evaluate"] is None and "first box" in test["note"] and test["annotated"] == 0
    assert np.loadtxt(Path(test["path"]) / "GOT-10k_Test_000001" / "GOT-10k_Test_000001_001.txt",
                      delimiter=",").shape == (4, 4)


def test_max_samples_limits_sequences_and_questions(cli, checkpoint, data, tmp_path):
    summary = cli.main(["predict", "--model", checkpoint["path"], "--data", data["small"], "--output-dir", str(tmp_path),
                        "--max-samples", "1", "--max-new-tokens", "2", "--device", "cpu",
                        "--tracking-first-frame", "sam2_box"])
    files = {(f["source"], f["split"]): f for f in summary["files"]}
    assert files[("lasot", "test")]["records"] == 1 and files[("lasot", "test")]["evaluate"] is None
    assert "1 of 2 sequences" in files[("lasot", "test")]["note"]
    assert files[("mvbench", "test")]["records"] == 1  # max_samples per spec


class ScriptedGenerate:
    """Stands in for `model.generate`: records the prompts and answers with fixed text."""

    def __init__(self, tokenizer, answers: list[str]):
        self.tokenizer, self.answers, self.prompts = tokenizer, answers, []

    def __call__(self, input_ids, **kwargs):
        self.prompts += [self.tokenizer.decode(row[row != self.tokenizer.pad_token_id]) for row in input_ids]
        tail = [self.tokenizer(a, add_special_tokens=False).input_ids for a in self.answers[: len(input_ids)]]
        width = max(len(t) for t in tail)
        tail = [t + [self.tokenizer.pad_token_id] * (width - len(t)) for t in tail]
        return torch.cat([input_ids, torch.tensor(tail)], 1)


def test_answer_prefix_and_reading_follow_the_benchmark(checkpoint, data, monkeypatch):
    model, processor = checkpoint["model"], checkpoint["processor"]
    mvbench = read_spec({**data["specs"][0], "tasks": ["episodic_reasoning"]}).to_list()
    lmms = read_spec({**data["specs"][0], "tasks": ["episodic_reasoning"], "convention": "lmms_eval"}).to_list()
    scripted = ScriptedGenerate(processor.tokenizer, ["C) Ryan", "c"])
    monkeypatch.setattr(model, "generate", scripted)
    official, lmms_eval = answer_choices(model, processor, mvbench + lmms, batch_size=2)
    assert scripted.prompts[0].endswith("Only give the best option.<|end|><|assistant|>Best option:(")
    assert scripted.prompts[1].endswith("directly.<|end|><|assistant|>")  # lmms-eval: no answer prefix
    assert (official.response, official.letter) == ("C) Ryan", "C")
    assert (lmms_eval.response, lmms_eval.letter) == ("c", "C")  # lmms-eval reads a lowercase letter
