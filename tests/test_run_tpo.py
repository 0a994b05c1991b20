"""examples/run_tpo.py: argument parsing (YAML + overrides), the shipped configs, per-stage data, resume
points, and a short end-to-end run (three stages, evaluation, metrics file, reloadable final model)."""

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from script_loader import load_script
from tpo.processing.readers import check_spec
from tpo.training.evaluation import REQUIRED_KEYS

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "examples" / "configs"


def _load_script():
    return load_script("examples/run_tpo.py")


run_tpo = _load_script()


def test_embedded_default_and_real_template_parse():
    script, model, training = run_tpo.parse_arguments([])
    assert script.data_config is None and script.stages == ["assign", "task", "joint"]
    assert model.model_name_or_path is None and training.output_dir == "outputs/tpo-default"

    script, model, training = run_tpo.parse_arguments([str(CONFIGS / "real_backbone_template.yaml"),
                                                      "--stages", "joint", "--lora_r", "8", "--use_cpu", "true"])
    assert script.stages == ["joint"] and model.lora_r == 8  # the command line overrides the YAML
    assert training.llm_training == "lora" and training.bf16 and training.warmup_steps == pytest.approx(0.2)
    assert training.learning_rate * training.head_lr_multiplier == pytest.approx(1e-4 * training.learning_rate / 2e-5)


def test_flags_alone_change_the_embedded_default_unless_they_name_a_model_or_data():
    script, model, training = run_tpo.parse_arguments(["--seed", "2", "--output-dir", "elsewhere"])
    assert training.seed == 2 and training.output_dir == "elsewhere"
    embedded = yaml.safe_load(run_tpo.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    assert embedded["task_epochs"] != 1.0 and embedded["llm_training"] != "lora"  # so the check below can fail
    assert script.task_epochs == embedded["task_epochs"] and training.llm_training == embedded["llm_training"]
    assert model.region_head_config and "heatmap" in model.region_head_config
    script, model, training = run_tpo.parse_arguments(["--model_name_or_path", "some/folder", "--seed", "2"])
    assert script.task_epochs == 1.0 and training.llm_training == "lora"  # the fields' own defaults
    script, model, training = run_tpo.parse_arguments(["--data-config=data.yaml"])
    assert script.data_config == "data.yaml" and script.task_epochs == 1.0



def test_yaml_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("not_an_argument: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown key"):
        run_tpo.parse_arguments([str(bad)])


def test_real_data_template_specs_are_valid():
    config = yaml.safe_load((CONFIGS / "real_data_template.yaml").read_text(encoding="utf-8"))
    assert set(config) <= set(run_tpo.DATA_CONFIG_KEYS)
    assert {"train_assign", "train_task", "train_joint", "test"} <= set(config)
    for key, specs in config.items():
        for spec in specs:
            reader, kwargs, _ = check_spec(spec)  # raises on an unknown format or key
            assert callable(reader) and kwargs


def _fake_checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint as far as resuming can tell: weights with a valid safetensors header, state last."""
    from safetensors.torch import save_file
    import torch

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}), encoding="utf-8")
    return folder


def test_stage_resume_point(tmp_path, caplog):
    stage_dir = tmp_path / "stage-task"
    assert run_tpo.stage_resume_point(None, str(stage_dir)) is None
    assert run_tpo.stage_resume_point("true", str(stage_dir)) is None  # nothing saved yet: a fresh start
    for step in (5, 20, 10):
        _fake_checkpoint(stage_dir / f"checkpoint-{step}", step)
    assert Path(run_tpo.stage_resume_point("true", str(stage_dir))).name == "checkpoint-20"
    # killed while saving: no state file, a state file cut short, a truncated weights file
    (stage_dir / "checkpoint-30").mkdir()
    (stage_dir / "checkpoint-40").mkdir()
    (stage_dir / "checkpoint-40" / "trainer_state.json").write_text('{"global_step": 4', encoding="utf-8")
    truncated = _fake_checkpoint(stage_dir / "checkpoint-50", 50) / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:12])
    with caplog.at_level(logging.WARNING):
        assert Path(run_tpo.stage_resume_point("true", str(stage_dir))).name == "checkpoint-20"
    assert {"checkpoint-30", "checkpoint-40", "checkpoint-50"} <= {
        Path(r.args[0]).name for r in caplog.records if "incomplete" in r.getMessage()}
    given = str(stage_dir / "checkpoint-10")
    assert run_tpo.stage_resume_point(given, str(stage_dir)) == given
    assert run_tpo.stage_resume_point(given, str(tmp_path / "stage-joint")) is None  # another stage's checkpoint


def test_data_config_rejects_unknown_keys(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("trian: []\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown key"):
        run_tpo.load_data(run_tpo.ScriptArguments(data_config=str(config)))


@pytest.mark.slow
def test_three_stages_end_to_end_with_stage_data(tmp_path, caplog):
    """A few steps per stage on the small synthetic benchmark, through a data config whose joint stage has
    its own data: every stage trains, the metrics file has the required keys, the final model reloads."""
    from tpo.processing.synthetic import generate_synthetic_benchmark

    manifest = generate_synthetic_benchmark(tmp_path / "synthetic", size="small", seed=0)
    splits = manifest["splits"]
    data_config = {
        "train": list(splits["train"].values()),
        "train_joint": [splits["train"]["region"], splits["train"]["conversation"]],
        "test": list(splits["test"].values()),
        "controls": {name: [spec] for name, spec in manifest["controls"]["test"].items()},
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data_config), encoding="utf-8")
    out = tmp_path / "run"
    argv = [str(CONFIGS / "synthetic_default.yaml"), "--data_config", str(tmp_path / "data.yaml"),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "0", "--logging_steps", "1",
            "--disable_tqdm", "true", "--tiny_num_layers", "1", "--num_frames", "4"]
    with caplog.at_level(logging.INFO, logger="run_tpo"):
        metrics = run_tpo.main(argv)

    stage_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stage ")]
    # the default's region warm-up, then the task stage
    assert [line.split(":")[0] for line in stage_lines] == ["Stage assign", "Stage task", "Stage task", "Stage joint"]
    assert "'train_joint'" in stage_lines[3] and "'train'" in stage_lines[0]
    assert (out / "stage-task-warmup-region").is_dir()
    saved = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert saved.pop("mask/j&f_mode") == "per_frame"  # the default config's mode, written next to the metric
    assert saved == pytest.approx(metrics)
    assert set(REQUIRED_KEYS) <= set(saved)
    assert saved["eval/skipped_samples"] == 0
    assert all(0.0 <= value <= 1.0 for key, value in saved.items() if "/" in key and not key.startswith("eval/"))
    # the controls and floors of the synthetic benchmark are reported
    assert {"control/region_query_swap_acc@0.5", "floor/region_query_blind_acc@0.5",
            "floor/temporal_query_blind_r1@0.5", "floor/mask_query_blind_miou"} <= set(saved)

    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out / "final", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out / "final", trust_remote_code=True)
    assert model.config.tasks == ["temporal", "region", "mask"]
    assert processor.task_token_ids == model.config.task_token_ids


def _save_checkpoint(family: str, folder: Path):
    """A tiny MLLM of `family` saved as a user's checkpoint: weights, tokenizer (chat template) and a PIL image
    processor, no processor_config (as many checkpoints on disk); returns the MLLM."""
    from transformers import (LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tpo import tiny

    tokenizer = tiny.build_tiny_tokenizer()
    if family == "llava":
        mllm = LlavaForConditionalGeneration(tiny.tiny_llava_config(tokenizer))
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    elif family == "qwen2_vl":
        mllm = Qwen2VLForConditionalGeneration(tiny.tiny_qwen2_vl_config(tokenizer))
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
    else:
        mllm = LlavaOnevisionForConditionalGeneration(tiny.tiny_llava_onevision_config(tokenizer))
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                          image_grid_pinpoints=tiny.TINY_ONEVISION_PINPOINTS)
    mllm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return mllm


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
def test_pretrained_checkpoint_on_disk_is_wrapped_with_its_own_processor(family, tmp_path):
    import torch
    from tiny_inputs import weighted_loss

    from tpo.processing.collator_tpo import collate_encoded
    from tpo.processing.schema import empty_sample
    from tpo.tiny import random_media

    mllm = _save_checkpoint(family, tmp_path)
    model_args = run_tpo.ModelArguments(model_name_or_path=str(tmp_path), enabled_tasks=["temporal", "region"],
                                        num_frames=4, dtype="float32",
                                        temporal_head_config='{"d_model": 32, "num_heads": 2, "dim_feedforward": 64}')
    model, processor = run_tpo.build_model(model_args, train_data=[])
    assert processor.layout == family and model.config.mllm_config.model_type == family
    saved = mllm.state_dict()
    for name, value in model.mllm.state_dict().items():  # pretrained weights kept, new token rows appended
        torch.testing.assert_close(value[: saved[name].shape[0]], saved[name], msg=name)
    samples = [
        empty_sample(id="r", task="region", media_type="image", media_path="a.png", query="red circle",
                     image_size=[40, 60], boxes_xyxy_pixels=[[6.0, 8.0, 30.0, 36.0]]),
        empty_sample(id="t", task="temporal", media_type="video", media_path="v.mp4", query="blue square",
                     image_size=[56, 56], duration_seconds=8.0, spans_seconds=[[2.0, 5.0]]),
    ]
    encoded = [processor.encode(sample) for sample in samples]
    batch = collate_encoded(processor, encoded, [random_media(e.media) for e in encoded])
    batch.pop("tpo_meta")
    out = model(**batch)
    assert torch.isfinite(out.loss) and {"lm", "assign", "region", "temporal"} <= set(out.loss_dict)
    torch.testing.assert_close(out.loss, weighted_loss(model, out))


def test_stage_names_are_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(run_tpo, "load_data", lambda *a: pytest.fail("data loaded before the stages were checked"))
    for stages in (["assign", "foo"], ["task", "task"]):
        with pytest.raises(ValueError, match="--stages"):
            run_tpo.main(["--output_dir", str(tmp_path / "x"), "--stages", *stages])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_warmup_runs_one_task_alone_before_the_task_stage(tmp_path, caplog):
    """--task_warmup_tasks region: a run on region samples alone between the assign and task stages, in its own
    stage folder; a warm-up task the model does not enable, or a warm-up without a task stage, is dropped with a
    warning (the embedded default warms up region; `--enabled_tasks temporal` must still run)."""
    from tpo.processing.synthetic import generate_synthetic_benchmark

    manifest = generate_synthetic_benchmark(tmp_path / "synthetic", size="small", seed=0)
    data_config = {"train": list(manifest["splits"]["train"].values()),
                   "test": [manifest["splits"]["test"]["region"]]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data_config), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["--data_config", str(tmp_path / "data.yaml"), "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--dataloader_num_workers",
            "0", "--disable_tqdm", "true", "--tiny_num_layers", "1", "--num_frames", "4", "--enabled_tasks",
            "temporal", "region", "--task_warmup_tasks", "region", "--max_eval_samples", "4"]
    with caplog.at_level(logging.INFO, logger="run_tpo"):
        run_tpo.main(argv)
    stage_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stage ")]
    assert [line.split(":")[0] for line in stage_lines] == ["Stage assign", "Stage task", "Stage task", "Stage joint"]
    region_samples = sum(1 for row in run_tpo.read_specs(data_config["train"]) if row["task"] == "region")
    assert stage_lines[1].startswith(f"Stage task: {region_samples} training samples")  # region alone
    assert (out / "stage-task-warmup-region").is_dir() and (out / "stage-task").is_dir()
    script, model_args, _ = run_tpo.parse_arguments(argv[:-4] + ["--task_warmup_tasks", "mask", "region"])
    with caplog.at_level(logging.WARNING, logger="run_tpo"):
        run_tpo.select_warmup_tasks(script, model_args.enabled_tasks)
    assert script.task_warmup_tasks == ["region"] and "['mask']: not among the enabled tasks" in caplog.text
    script, model_args, _ = run_tpo.parse_arguments(argv + ["--stages", "assign", "joint"])
    run_tpo.select_warmup_tasks(script, model_args.enabled_tasks)
    assert script.task_warmup_tasks == []
    script, model_args, _ = run_tpo.parse_arguments(argv)
    run_tpo.select_warmup_tasks(script, model_args.enabled_tasks, preset="release")  # the paper's schedule
    assert script.task_warmup_tasks == []


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, caplog):
    out = tmp_path / "run"
    with run_tpo.output_dir_lock(out, take_over=False):
        lock = json.loads((out / ".tpo_run.lock").read_text())
        assert lock["pid"] == os.getpid()
        with pytest.raises(RuntimeError, match="in use by another run"):
            with run_tpo.output_dir_lock(out, take_over=False):
                pass
        with caplog.at_level(logging.WARNING):
            with run_tpo.output_dir_lock(out, take_over=True):  # --overwrite_output_dir
                pass
        assert any("Taking over" in r.getMessage() for r in caplog.records)
    assert not (out / ".tpo_run.lock").exists()  # released
    (out / ".tpo_run.lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": __import__("socket").gethostname()}))
    with run_tpo.output_dir_lock(out, take_over=False):  # a lock left by a process that is gone is taken over
        pass
    with run_tpo.output_dir_lock(out, take_over=False, is_main_process=False):  # other ranks do not lock
        assert not (out / ".tpo_run.lock").exists()


def test_final_model_is_saved_whole_or_not_at_all(tmp_path):
    class Saves:
        def __init__(self, fail: bool):
            self.fail = fail

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "config.json").write_text("{}")
            if self.fail:
                raise OSError(28, "No space left on device")
            (Path(folder) / "model.safetensors").write_text("weights")

    final = tmp_path / "final"
    run_tpo.save_final(Saves(False), Saves(False), final)
    assert (final / "model.safetensors").exists()
    with pytest.raises(OSError, match="No space"):
        run_tpo.save_final(Saves(True), Saves(False), final)
    assert (final / "model.safetensors").exists()  # the complete earlier one is kept, nothing half-written in its place
    assert not (tmp_path / "final.partial" / "model.safetensors").exists()
