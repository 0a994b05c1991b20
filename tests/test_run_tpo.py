"""examples/run_tpo.py: argument parsing (YAML + overrides), the shipped configs, per-stage data, resume
points, and a short end-to-end run (three stages, evaluation, metrics file, reloadable final model)."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import yaml

from tpo.processing.readers import check_spec
from tpo.training.evaluation import REQUIRED_KEYS

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "examples" / "configs"


def _load_script():
    spec = importlib.util.spec_from_file_location("run_tpo", REPO_ROOT / "examples" / "run_tpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_stage_resume_point(tmp_path):
    stage_dir = tmp_path / "stage-task"
    assert run_tpo.stage_resume_point(None, str(stage_dir)) is None
    assert run_tpo.stage_resume_point("true", str(stage_dir)) is None  # nothing saved yet: a fresh start
    for step in (5, 20, 10):
        (stage_dir / f"checkpoint-{step}").mkdir(parents=True)
    assert Path(run_tpo.stage_resume_point("true", str(stage_dir))).name == "checkpoint-20"
    given = str(stage_dir / "checkpoint-10")
    assert run_tpo.stage_resume_point(given, str(stage_dir)) == given
    assert run_tpo.stage_resume_point(given, str(tmp_path / "stage-joint")) is None  # another stage's checkpoint


def test_data_config_rejects_unknown_keys(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("trian: []\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown key"):
        run_tpo.load_data(run_tpo.ScriptArguments(data_config=str(config)))


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
    assert [line.split(":")[0] for line in stage_lines] == ["Stage assign", "Stage task", "Stage joint"]
    assert "'train_joint'" in stage_lines[2] and "'train'" in stage_lines[0]
    saved = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert saved == pytest.approx(metrics)
    assert set(REQUIRED_KEYS) <= set(saved)
    assert all(0.0 <= value <= 1.0 for key, value in saved.items() if "/" in key)

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

    from tpo.training import tiny

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

    from tpo.processing.collator_tpo import collate_encoded
    from tpo.processing.schema import empty_sample
    from tpo.training.tiny import random_media

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
