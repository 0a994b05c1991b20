"""examples/study_tpo.py and what it needs: the text-coordinate answer format (processor, evaluation), the
conversation metrics and floors, every arm training a few steps, resuming, and the report writer."""

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from script_loader import load_script
from tpo.processing.processing_tpo import (
    TASK_LABELS,
    format_box_text,
    format_spans_text,
    parse_box_text,
    parse_spans_text,
)
from tpo.processing.schema import empty_sample
from tpo.training.evaluation import Predictions, TaskEvaluator, compute_task_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    return load_script("examples/study_tpo.py")


study_tpo = _load_script()


# ---- the text-coordinate format ---------------------------------------------------------------------
@pytest.mark.parametrize("box", [[0, 0, 128, 128], [12, 40, 57, 88], [3, 97, 64, 101]])
def test_box_text_round_trips(box):
    text = format_box_text(box)
    assert text == "[" + ", ".join(str(v) for v in box) + "]"
    assert parse_box_text(text) == [float(v) for v in box]
    assert parse_box_text(f"it is at {text}.") == [float(v) for v in box]


def test_box_text_rounds_to_whole_pixels_and_spans_to_tenths():
    assert format_box_text([12.4, 39.6, 57.5, 88.49]) == "[12, 40, 58, 88]"
    assert parse_box_text(format_box_text([12.4, 39.6, 57.5, 88.49])) == pytest.approx([12.4, 39.6, 57.5, 88.49], abs=0.5)
    spans = [[2.5, 6.0], [8.0, 11.5]]
    assert format_spans_text(spans) == "from 2.5 to 6.0 seconds and from 8.0 to 11.5 seconds"
    assert parse_spans_text(format_spans_text(spans)) == spans
    assert parse_spans_text(format_spans_text([[1.04, 3.96]]))[0] == pytest.approx([1.04, 3.96], abs=0.05)


@pytest.mark.parametrize("text", ["", "the red circle", "[12, 40, 57]", "[57, 40, 12, 88]", "[12, 40, 57, 40]",
                                  "12, 40, 57, 88", None])
def test_malformed_box_text_is_none(text):
    assert parse_box_text(text) is None


@pytest.mark.parametrize("text", ["", "from 2.5 seconds", "from 6.0 to 2.5 seconds", "2.5 to 6.0",
                                  "from 2.5 to 6.0 seconds and from 9.0 to 9.0 seconds", None])
def test_malformed_span_text_is_none(text):
    assert parse_spans_text(text) is None


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tpo.processing.processing_tpo import TPOProcessor

    return TPOProcessor(SiglipImageProcessorPil(size={"height": 32, "width": 32}), tiny_tokenizer, image_seq_length=16,
                        num_frames=4, text_coordinate_tasks=["region", "temporal"])


def _region_sample():
    return empty_sample(id="r0", task="region", media_type="image", media_path="x.png", query="red circle",
                        image_size=[100, 200], boxes_xyxy_pixels=[[10.0, 20.0, 110.0, 60.0]])


def _temporal_sample():
    return empty_sample(id="t0", task="temporal", media_type="video", media_path="x.mp4", query="red circle",
                        image_size=[64, 64], duration_seconds=16.0, spans_seconds=[[2.5, 6.0]])


def test_processor_trains_text_coordinates_on_the_lm_alone(processor):
    for sample, answer in ((_region_sample(), "[10, 20, 110, 60]"), (_temporal_sample(), "from 2.5 to 6.0 seconds")):
        encoded = processor.encode(sample, mode="train")
        labelled = [t for t in encoded.labels if t != -100]
        assert processor.tokenizer.decode(labelled, skip_special_tokens=True).strip() == answer
        assert encoded.task_label == TASK_LABELS["text"] and encoded.targets == {}  # no head, no router task
        begin_tokens = {entry["begin"] for entry in processor.task_token_ids.values()}
        assert not begin_tokens & set(encoded.input_ids)
        assert processor.parse_text_coordinates(sample["task"], answer) is not None
        with pytest.raises(ValueError, match="generate"):
            processor.encode(sample, mode="force_task")
    assert "text_coordinate_tasks" in processor.to_dict()  # saved with the processor
    with pytest.raises(ValueError, match="masks have none"):
        type(processor)(processor.image_processor, processor.tokenizer, image_seq_length=16,
                        text_coordinate_tasks=["mask"])
    broken = {**_region_sample(), "boxes_xyxy_pixels": []}
    with pytest.raises(ValueError, match="exactly one box"):  # checked before it becomes an answer
        processor.encode(broken, mode="train")


def _model_stub():
    """What `TaskEvaluator.predict` touches of a model when `_generate` is replaced."""
    return SimpleNamespace(training=False, eval=lambda: None, train=lambda mode=True: None,
                           config=SimpleNamespace(task_token_ids={}))


def test_unparseable_text_coordinates_are_counted_misses(processor):
    gt = [[10.0, 20.0, 110.0, 60.0], [0.0, 0.0, 50.0, 50.0], [30.0, 30.0, 90.0, 90.0]]
    region = [{**_region_sample(), "id": f"r{i}", "boxes_xyxy_pixels": [box]} for i, box in enumerate(gt)]
    temporal = [{**_temporal_sample(), "id": f"t{i}", "spans_seconds": [span]}
                for i, span in enumerate([[2.5, 6.0], [8.0, 12.0]])]
    answers = {"r0": "[10, 20, 110, 60]", "r1": "somewhere on the left", "r2": "[90, 90, 30, 30]",
               "t0": "from 2.5 to 6.0 seconds", "t1": "from 12.0 to 8.0 seconds"}
    evaluator = TaskEvaluator(processor, region + temporal, batch_size=8)
    evaluator._generate = lambda model, samples, max_new_tokens: [(s, 0, answers[s["id"]], [7]) for s in samples]
    metrics = compute_task_metrics(evaluator.predict(_model_stub()))
    assert metrics["region/acc@0.5"] == pytest.approx(1 / 3) and metrics["region/unparseable_answers"] == 2
    assert metrics["temporal/r1@0.5"] == pytest.approx(1 / 2) and metrics["temporal/unparseable_answers"] == 1
    assert "highlight/hit@1" not in metrics  # text answers give no saliency
    assert metrics["router/end_to_end_accuracy"] == 1.0  # every one answered in (non-empty) text


def test_conversation_metrics_per_category_and_floors():
    predictions = Predictions()
    rows = [("red (A)", "A", "colour", False), ("blue (B)", "C", "colour", True), ("three (C)", "C", "count", False),
            ("D", "C", "count", True)]
    for i, (said, answer, category, held_out) in enumerate(rows):
        predictions.text.append({"id": str(i), "prediction": said, "reference": said, "options": ["a", "b", "c", "d"],
                                 "answer": answer, "category": category, "held_out": held_out})
    predictions.text.append({"id": "o", "prediction": "Red.", "reference": "red", "options": [], "answer": "",
                             "category": "colour", "held_out": False})
    metrics = compute_task_metrics(predictions)
    assert metrics["mcqa/accuracy"] == 0.5 and metrics["mcqa/accuracy_colour"] == 0.5
    assert metrics["mcqa/accuracy_count"] == 0.5 and metrics["mcqa/accuracy_held_out"] == 0.0
    assert metrics["mcqa/accuracy_seen"] == 1.0 and metrics["text/exact_match_colour"] == 1.0
    assert metrics["floor/mcqa_chance"] == 0.25 and metrics["floor/mcqa_majority_letter"] == 0.75  # "C" 3 of 4


def _mc_sample(sample_id: str, options: list[str], answer: str) -> dict:
    letter = "ABCD"[options.index(answer)]
    question = "What colour is it?\n" + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
    return empty_sample(id=sample_id, task="text", media_type="none", options=options, answer=letter,
                        conversations=[{"role": "user", "content": question},
                                       {"role": "assistant", "content": f"{answer} ({letter})"}])


class _FavouringLM:
    """A model stub whose next-token logits favour `favoured` token ids by `margin` at every position."""

    def __init__(self, vocab_size: int, favoured: set[int], margin: float = 8.0):
        self.vocab_size, self.favoured, self.margin = vocab_size, sorted(favoured), margin
        self.training, self.config = False, SimpleNamespace(task_token_ids={})
        self.eval = lambda: None
        self.train = lambda mode=True: None

    def parameters(self):
        yield torch.zeros(1)

    def __call__(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.favoured] = self.margin
        return SimpleNamespace(logits=logits, router_logits=torch.zeros(len(input_ids), 4))


def test_ranked_options_pick_the_likeliest_option_text(processor):
    """Rank classification: the option whose tokens the model favours wins, whatever its letter; with uniform logits
    an answer scores exactly -(its own tokens) x log(vocab), the end-of-turn tokens after it left out."""
    tokenizer = processor.tokenizer
    vocab = len(tokenizer)
    samples = [_mc_sample("q0", ["red", "blue", "green"], "blue"), _mc_sample("q1", ["blue", "green", "red"], "red"),
               _mc_sample("q2", ["green", "red", "blue"], "green")]
    evaluator = TaskEvaluator(processor, samples, batch_size=4)
    favoured = set(tokenizer("blue", add_special_tokens=False)["input_ids"])
    ranked = evaluator._ranked_options(_FavouringLM(vocab, favoured), samples)
    assert ranked == {"q0": "B", "q1": "A", "q2": "C"}  # "blue" wherever it is listed
    uniform = _FavouringLM(vocab, set(), margin=0.0)
    encoded = processor.encode(samples[0], mode="train")
    labels = torch.tensor(encoded.labels)
    logits = uniform(torch.tensor([encoded.input_ids])).logits[0]
    own_tokens = len(tokenizer("blue (B)", add_special_tokens=False)["input_ids"])
    assert (labels != -100).sum() > own_tokens  # the reply's end-of-turn tokens are labelled too, and left out
    assert evaluator._answer_log_likelihood(logits, labels, "blue (B)") == pytest.approx(-own_tokens * math.log(vocab),
                                                                                        rel=1e-5)
    # a few-shot turn before the question: only the last answer is scored
    shot = {**samples[0], "conversations": [{"role": "user", "content": "What colour is the sky?"},
                                            {"role": "assistant", "content": "blue"}, *samples[0]["conversations"]]}
    encoded = processor.encode(shot, mode="train")
    logits = uniform(torch.tensor([encoded.input_ids])).logits[0]
    assert evaluator._answer_log_likelihood(logits, torch.tensor(encoded.labels), "blue (B)") == pytest.approx(
        -own_tokens * math.log(vocab), rel=1e-5)
    unanswered = {**samples[0], "conversations": samples[0]["conversations"][:1]}
    assert evaluator._ranked_options(_FavouringLM(vocab, favoured), [unanswered]) == {"q0": "B"}
    # in the metrics: only q0's answer is "blue"
    generated = {s["id"]: (s, 0, "x", [5]) for s in samples}
    evaluator._generate = lambda model, batch, max_new_tokens: [generated[s["id"]] for s in batch]
    metrics = compute_task_metrics(evaluator.predict(_FavouringLM(vocab, favoured)))
    assert metrics["mcqa/ranked_accuracy"] == pytest.approx(1 / 3) and metrics["mcqa/accuracy"] == 0.0
    off = TaskEvaluator(processor, samples, batch_size=4, rank_options=False)
    off._generate = evaluator._generate
    assert "mcqa/ranked_accuracy" not in compute_task_metrics(off.predict(_FavouringLM(vocab, favoured)))


def test_blank_media_is_uniform_and_refuses_mask_frames():
    image = study_tpo.blank_media({"kind": "image", "height": 5, "width": 7})["image"]
    assert image.shape == (5, 7, 3) and (image == 128).all()
    video = study_tpo.blank_media({"kind": "video", "height": 4, "width": 4, "timestamps": [1.0, 3.0]})
    assert video["frames"].shape == (2, 4, 4, 3) and video["timestamps"] == [1.0, 3.0]
    with pytest.raises(ValueError, match="frames"):
        study_tpo.blank_media({"kind": "video", "height": 4, "width": 4, "timestamps": [1.0]}, {"mask_frames": [0]})


def test_arms_as_configured():
    base = study_tpo.ModelArguments(region_head_config='{"mode": "heatmap", "heatmap_dim": 128}',
                                    temporal_head_config='{"d_model": 64, "decoder": "dense"}')
    released = study_tpo.arm_model_arguments(base, study_tpo.ARMS["tpo_released"])
    assert json.loads(released.region_head_config) == {"mode": "mlp"}
    assert json.loads(released.temporal_head_config) == {"d_model": 64, "decoder": "detr"}
    text = study_tpo.arm_model_arguments(base, study_tpo.ARMS["text_coords"])
    assert text.enabled_tasks == [] and text.text_coordinate_tasks == ["temporal", "region"]
    assert study_tpo.arm_model_arguments(base, study_tpo.ARMS["single_task/mask"]).enabled_tasks == ["mask"]
    assert study_tpo.stage_sizes(100, 50, 0.3) == {"assign": 150, "task": 130, "joint": 150}
    assert study_tpo.stage_sizes(0, 50, 0.3)["task"] == 50  # no grounding: the conversations


# ---- every arm, end to end, and resuming -------------------------------------------------------------
TINY = ["--synthetic_size", "small", "--quick", "--quick_train_fraction", "1.0", "--assign_epochs", "0.1",
        "--task_epochs", "0.1", "--joint_epochs", "0.1", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "16", "--dataloader_num_workers", "0", "--tiny_num_layers", "1",
        "--tiny_hidden_size", "64", "--num_frames", "4", "--workers", "1"]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    argv = [*TINY, "--synthetic_dir", str(root / "synthetic"), "--output_dir", str(root / "out")]
    return root, argv, study_tpo.main(argv)


@pytest.mark.slow
def test_every_arm_trains_and_is_scored(study_run):
    root, _, results = study_run
    arms = results["arms"]
    assert list(arms) == list(study_tpo.ARMS)
    steps = {name: arm["steps_per_stage"] for name, arm in arms.items()}
    matched = [name for name, spec in study_tpo.ARMS.items() if spec.matched_steps and not spec.conversation_exposure]
    assert sum(steps["conversation_matched"].values()) < sum(steps["tpo"].values())
    assert all(steps[name] == steps["tpo"] for name in matched)  # the same optimiser steps per stage
    assert all(sum(steps[f"single_task/{t}"].values()) < sum(steps["tpo"].values()) for t in ("temporal", "region"))
    for name, arm in arms.items():
        assert arm["seeds"] == [0] and arm["wall_seconds_mean"] > 0
        assert "mcqa/accuracy" in arm["mean"] and "floor/mcqa_chance" in arm["mean"]
    assert {"temporal/r1@0.5", "region/acc@0.5", "mask/j&f"} <= set(arms["tpo"]["mean"])
    coords = arms["text_coords"]["mean"]
    assert {"temporal/unparseable_answers", "region/unparseable_answers", "control/region_query_swap_acc@0.5"} <= set(coords)
    assert not any(key.startswith("mask/") for key in coords)  # masks have no text format
    assert set(arms["single_task/mask"]["mean"]) & {"temporal/r1@0.5", "region/acc@0.5"} == set()
    assert not any(key.split("/")[0] in ("temporal", "region", "mask") for key in arms["conversation_only"]["mean"])
    folder = root / "out" / "quick"
    saved = json.loads((folder / study_tpo.RESULTS_FILE).read_text(encoding="utf-8"))
    assert saved["arms"]["tpo"]["mean"] == pytest.approx(arms["tpo"]["mean"])
    assert (folder / study_tpo.REPORT_FILE).read_text(encoding="utf-8").count("| tpo |") >= 1
    assert Image.open(folder / study_tpo.CHART_FILE).size[0] > 300


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_refuses_other_settings(study_run, caplog, monkeypatch):
    root, argv, _ = study_run
    path = root / "out" / "quick" / study_tpo.RESULTS_FILE
    results = json.loads(path.read_text(encoding="utf-8"))
    del results["arms"]["text_prior"]  # as if the study had stopped before its last arm
    path.write_text(json.dumps(results), encoding="utf-8")
    ran = []
    real = study_tpo.run_arm
    monkeypatch.setattr(study_tpo, "run_arm", lambda name, seed, *args: ran.append(name) or real(name, seed, *args))
    with caplog.at_level(logging.INFO, logger="study_tpo"):
        again = study_tpo.main(argv)
    assert ran == ["text_prior"] and set(again["arms"]) == set(study_tpo.ARMS)
    assert sum("already in" in r.getMessage() for r in caplog.records) == len(study_tpo.ARMS) - 1
    with pytest.raises(ValueError, match="other settings"):
        study_tpo.main([*argv, "--joint_epochs", "0.2"])


def test_parallel_processes_share_a_folder(study_run, caplog, monkeypatch):
    """A run whose folder a live process holds is left to it; a run finished meanwhile by another process is
    merged into the results file, not overwritten."""
    import os
    import socket

    root, argv, _ = study_run
    folder = root / "out" / "quick"
    path = folder / study_tpo.RESULTS_FILE
    results = json.loads(path.read_text(encoding="utf-8"))
    tpo_run = results["arms"]["tpo"]["runs"]["0"]
    for arm in ("text_prior", "conversation_only"):
        del results["arms"][arm]
    path.write_text(json.dumps(results), encoding="utf-8")
    busy = folder / "text_prior" / "seed-0"
    busy.mkdir(parents=True, exist_ok=True)
    (busy / ".tpo_run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    def another_process_finishes_tpo_seed_1(name, seed, *args):
        with study_tpo.results_lock(folder):
            shared = json.loads(path.read_text(encoding="utf-8"))
            study_tpo.record_run(shared, "tpo", 1, tpo_run)
            study_tpo.write_json(path, shared)
        return tpo_run

    monkeypatch.setattr(study_tpo, "run_arm", another_process_finishes_tpo_seed_1)
    with caplog.at_level(logging.INFO, logger="study_tpo"):
        merged = study_tpo.main(argv)
    assert "text_prior" not in merged["arms"]  # the other process's
    assert any("another study process is running it" in r.getMessage() for r in caplog.records)
    assert merged["arms"]["conversation_only"]["seeds"] == [0]
    assert merged["arms"]["tpo"]["seeds"] == [0, 1]  # kept while this process recorded conversation_only
    assert json.loads(path.read_text(encoding="utf-8"))["arms"]["tpo"]["seeds"] == [0, 1]
    (busy / ".tpo_run.lock").unlink()


@pytest.mark.slow
def test_workers_share_the_runs(tmp_path, caplog):
    """--workers 2: a second process with the same arguments; every run is done once, by one of them, and all are
    recorded in one results file."""
    argv = [*TINY, "--synthetic_dir", str(tmp_path / "synthetic"), "--output_dir", str(tmp_path / "out"),
            "--arms", "conversation_only", "text_prior", "single_task/temporal", "--workers", "2"]
    with caplog.at_level(logging.INFO, logger="study_tpo"):
        results = study_tpo.main(argv)
    assert list(results["arms"]) == ["single_task/temporal", "conversation_only", "text_prior"]
    log = (tmp_path / "out" / "quick" / "worker-1.log").read_text(encoding="utf-8")
    done_here = [r.getMessage() for r in caplog.records if " done in " in r.getMessage()]
    done_there = [line for line in log.splitlines() if " done in " in line]
    assert len(done_here) + len(done_there) == 3  # each run once
    assert "Started 1 more study processes" in caplog.text


def test_a_failing_study_stops_its_workers(tmp_path, monkeypatch):
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    monkeypatch.setattr(study_tpo, "start_workers", lambda study, argv, folder: [(sleeper, tmp_path / "w.log")])

    def fail(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(study_tpo, "run_all", fail)
    argv = [*TINY, "--synthetic_dir", str(tmp_path / "synthetic"), "--output_dir", str(tmp_path / "out"),
            "--workers", "2"]
    with pytest.raises(RuntimeError, match="boom"):
        study_tpo.main(argv)
    assert sleeper.poll() is not None  # terminated, not left running for its two minutes


def test_warmup_runs_and_matched_steps():
    script = SimpleNamespace(stages=["assign", "task", "joint"], task_warmup_tasks=["region"], task_warmup_epochs=0.5,
                             task_stage_conversations=0.5, assign_epochs=1.0, task_epochs=2.0, joint_epochs=1.0)
    training = SimpleNamespace(per_device_train_batch_size=10, gradient_accumulation_steps=1)
    data = {"train": {"temporal": [0] * 40, "region": [0] * 60, "mask_image": [0] * 20, "mask_video": [0] * 20,
                      "conversation": [0] * 100}}
    runs = {name: study_tpo.training_runs(spec, script) for name, spec in study_tpo.ARMS.items()}
    assert runs["tpo"] == [("assign", "assign", None), ("task-warmup-region", "task", "region"),
                           ("task", "task", None), ("joint", "joint", None)]
    assert runs["single_task/temporal"] == [("assign", "assign", None), ("task", "task", None), ("joint", "joint", None)]
    assert runs["single_task/region"] == runs["tpo"] == runs["conversation_only"] == runs["text_coords"]
    # tpo: 140 grounding + 100 conversations; the task stage adds 70 conversations; the warm-up 60 region + 30
    tpo = study_tpo.arm_steps(study_tpo.ARMS["tpo"], data, script, training)
    assert tpo == {"assign": 24, "task-warmup-region": 5, "task": 42, "joint": 24}
    assert study_tpo.arm_steps(study_tpo.ARMS["conversation_only"], data, script, training) == tpo
    # conversation_matched: tpo's steps x the conversations' share of each run's data (100/240, 30/90, 70/210)
    assert study_tpo.arm_steps(study_tpo.ARMS["conversation_matched"], data, script, training) == {
        "assign": 10, "task-warmup-region": 2, "task": 14, "joint": 10}
    # single_task/region: its own 60 samples (+ 30 conversations in the task stage and the warm-up)
    assert study_tpo.arm_steps(study_tpo.ARMS["single_task/region"], data, script, training) == {
        "assign": 16, "task-warmup-region": 5, "task": 18, "joint": 16}
    no_warmup = SimpleNamespace(**{**vars(script), "task_warmup_tasks": []})
    assert "task-warmup-region" not in study_tpo.arm_steps(study_tpo.ARMS["tpo"], data, no_warmup, training)


# ---- the report ---------------------------------------------------------------------------------------
def _hand_made_results() -> dict:
    def arm(values: dict, seeds=(0, 1)):
        runs = {str(s): {"metrics": {k: v[i] for k, v in values.items()}, "steps": {"assign": 2, "task": 3, "joint": 2},
                         "total_steps": 7, "wall_seconds": 10.0 + i} for i, s in enumerate(seeds)}
        return {"runs": runs, **study_tpo.summarise_arm(runs)}

    floors = {"floor/temporal_query_blind_r1@0.5": [0.4, 0.4], "floor/mcqa_chance": [0.25, 0.25],
              "floor/mcqa_majority_letter": [0.3, 0.3]}
    return {"description": "hand-made", "arms": {
        "tpo": arm({"temporal/r1@0.5": [0.5, 0.7], "mcqa/accuracy": [0.6, 0.6], "mcqa/accuracy_colour": [0.8, 0.6],
                    **floors}),
        "text_coords": arm({"temporal/r1@0.5": [0.2, 0.2], "temporal/unparseable_answers": [3.0, 1.0],
                            "mcqa/accuracy": [0.5, 0.7], **floors}),
        "conversation_only": arm({"mcqa/accuracy": [0.7, 0.7], **floors}),
        "text_prior": arm({"mcqa/accuracy": [0.35, 0.25], **floors}),
    }}


def test_summaries_and_report_from_a_hand_made_results_file(tmp_path):
    results = _hand_made_results()
    tpo = results["arms"]["tpo"]
    assert tpo["mean"]["temporal/r1@0.5"] == pytest.approx(0.6) and tpo["std"]["temporal/r1@0.5"] == pytest.approx(0.1)
    assert tpo["steps"] == 7 and tpo["wall_seconds_mean"] == 10.5 and tpo["seeds"] == [0, 1]
    study_tpo.write_report(results, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    heads_row = next(line for line in report.splitlines() if "| tpo | 0.600 ± 0.100 | text_coords |" in line)
    assert "+0.400 (spread 0.100): holds" in heads_row and "| 0.400 |" in heads_row and "40.2" in heads_row
    mcq_row = next(line for line in report.splitlines() if "`mcqa/accuracy` | tpo" in line)
    assert "-0.100 (spread 0.000): reversed" in mcq_row and "66.8" in mcq_row
    below = {"arms": {name: {**arm, "mean": {**arm["mean"], "floor/temporal_query_blind_r1@0.5": 0.8}}
                      for name, arm in results["arms"].items()}}
    assert study_tpo._verdict(below["arms"]["tpo"], below["arms"]["text_coords"], "temporal/r1@0.5") == (
        "+0.400: both at or below the floor, no evidence")
    assert "chance 0.250, always the majority letter 0.300" in report and "0.300 ± 0.050" in report  # text prior
    assert "| `mcqa/accuracy_colour` | 0.700 ± 0.100 |" in report
    assert "| tpo | 0, 1 | 7 (assign 2, task 3, joint 2) | 10 |" in report
    assert "| tpo | 1 | 0.700 | - | - | 0.600 | - | - |" in report  # per seed: temporal, region, mask, mcqa, ...
    assert "| text_prior | 0 | - | - | - | 0.350 | - | - |" in report
    assert "| (a) heads beat text coordinates | `temporal/r1@0.5` | tpo_released | - |" in report  # an arm not run
    study_tpo.draw_chart(results, tmp_path / "chart.png")
    pixels = np.asarray(Image.open(tmp_path / "chart.png").convert("RGB"))
    assert (pixels == (31, 119, 180)).all(-1).sum() > 100  # tpo's bars
    assert (pixels == (200, 0, 0)).all(-1).sum() > 20  # a floor
