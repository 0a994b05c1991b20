"""TPOTrainer: stages (what trains, which losses count), learning-rate groups, per-term logging,
resume reproducing the uninterrupted run, non-finite loss and bad-media handling."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny_inputs import fake_media, training_samples
from peft import LoraConfig
from transformers import LlavaForConditionalGeneration, TrainerCallback
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tpo import TPOForConditionalGeneration
from tpo.processing.data_collator import TPODataCollator
from tpo.processing.pipeline import encode_dataset
from tpo.processing.processing_tpo import TPOProcessor
from tpo.training.arguments import TPOTrainingArguments
from tpo.training.stages import parameter_group
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config
from tpo.training.trainer import NonFiniteLossError, TPOTrainer


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(tiny_llava_config(tokenizer)), tasks=["temporal", "region"], tokenizer=tokenizer
    )
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=2)
    dataset = encode_dataset(Dataset.from_list(training_samples()), processor)
    return model, processor, dataset, tmp_path


def make_args(tmp_path, stage: str, **overrides) -> TPOTrainingArguments:
    settings = dict(output_dir=str(tmp_path / f"out-{stage}"), stage=stage, per_device_train_batch_size=4,
                    max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                    use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    settings.update(overrides)
    return TPOTrainingArguments(**settings)


class LogCollector(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_parameter_groups_by_name():
    assert parameter_group("mllm.model.language_model.layers.0.self_attn.q_proj.weight") == "llm"
    assert parameter_group("base_model.model.mllm.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora"
    assert parameter_group("base_model.model.region_head.modules_to_save.default.fc1.weight") == "task_heads"
    assert parameter_group("base_model.model.region_head.original_module.fc1.weight") == "frozen_copy"
    assert parameter_group("mllm.model.multi_modal_projector.linear_1.weight") == "projector"
    assert parameter_group("mllm.model.visual.merger.mlp.0.weight") == "projector"
    assert parameter_group("mllm.model.vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert parameter_group("mask_head.sam2.vision_encoder.backbone.x") == "sam2_image_encoder"
    assert parameter_group("mask_head.prompt_mlp.0.weight") == "task_heads"
    assert parameter_group("task_tokens.embeddings.region") == "task_tokens"


def test_stages_train_what_they_should_and_log_every_term(setup):
    model, processor, dataset, tmp_path = setup
    collator = TPODataCollator(processor, media_loader=fake_media)
    peft_config = LoraConfig(r=4, lora_alpha=8)

    logs = LogCollector()
    trainer = TPOTrainer(model=model, args=make_args(tmp_path, "assign"), peft_config=peft_config,
                         train_dataset=dataset, data_collator=collator, callbacks=[logs])
    assert set(trainer.trainable_per_group) == {"lora", "router"}
    tpo = trainer.model.get_base_model()
    assert trainer.stage_loss_weights["region"] == 0.0 and trainer.stage_loss_weights["assign"] == 1.0
    assert tpo.config.loss_weights["region"] == 1.0  # the config keeps its own weights
    head_before = tpo.region_head.modules_to_save["default"].fc1.weight.detach().clone()
    trainer.train()
    assert torch.equal(tpo.region_head.modules_to_save["default"].fc1.weight, head_before)
    train_logs = [entry for entry in logs.logs if "loss/lm" in entry]
    assert train_logs and {"loss/lm", "loss/assign", "data/skipped_samples"} <= set(train_logs[0])
    assert not any("loss/region" in entry for entry in logs.logs)  # not counted in this stage: not computed
    lrs = {group["tpo_group"]: group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert lrs["router"] == pytest.approx(5e-3) and lrs["lora"] == pytest.approx(1e-3)

    peft_model = trainer.model
    trainer = TPOTrainer(model=peft_model, args=make_args(tmp_path, "task"), train_dataset=dataset,
                         data_collator=collator)
    assert set(trainer.trainable_per_group) == {"task_heads", "task_tokens"}
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    router_before = {n: p.detach().clone() for n, p in tpo.router.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if "lora_" in n)
    assert not torch.equal(tpo.region_head.modules_to_save["default"].fc1.weight, head_before)
    # exactly the task parts train: the router stays, and PEFT's original head stays behind its trained copy
    assert all(torch.equal(p, router_before[n]) for n, p in tpo.router.named_parameters())
    assert torch.equal(tpo.region_head.original_module.fc1.weight, head_before)

    trainer = TPOTrainer(model=peft_model, args=make_args(tmp_path, "joint"), train_dataset=dataset,
                         data_collator=collator)
    assert set(trainer.trainable_per_group) == {"lora", "router", "task_heads", "task_tokens", "projector"}
    assert all(trainer.stage_loss_weights[k] > 0 for k in ("lm", "assign", "temporal", "region"))
    assert trainer.stage_loss_weights["mask"] == 0.0  # not an enabled task
    trainer.train()


def _losses(log_collector):
    return [entry["loss"] for entry in log_collector.logs if "loss" in entry]


class StopAt(TrainerCallback):
    """Interrupts training after a given step (as a crash would, right after a checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_reproduces_the_uninterrupted_run(setup):
    model, processor, dataset, tmp_path = setup
    collator = TPODataCollator(processor, media_loader=fake_media)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, llm_training="full", train_vision_tower=True)

    full_logs = LogCollector()
    TPOTrainer(model=model, args=make_args(tmp_path / "a", "joint", **common), train_dataset=dataset,
               data_collator=collator, callbacks=[full_logs]).train()

    model.load_state_dict(initial)
    TPOTrainer(model=model, args=make_args(tmp_path / "b", "joint", **common), train_dataset=dataset,
               data_collator=collator, callbacks=[StopAt(3)]).train()
    checkpoint = tmp_path / "b" / "out-joint" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists()

    fresh = TPOForConditionalGeneration.from_pretrained(checkpoint)
    for value in fresh.state_dict().values():  # scramble, so that only the resume can restore the weights
        if value.is_floating_point():
            value.normal_()
    resumed_logs = LogCollector()
    TPOTrainer(model=fresh, args=make_args(tmp_path / "b", "joint", **common), train_dataset=dataset,
               data_collator=collator, callbacks=[resumed_logs]).train(resume_from_checkpoint=str(checkpoint))
    assert len(_losses(full_logs)) == 6 and len(_losses(resumed_logs)) == 3
    np.testing.assert_allclose(_losses(resumed_logs), _losses(full_logs)[3:], rtol=1e-5)


def test_resuming_a_finished_run_takes_no_extra_step(setup):
    """max_steps 5 with 3 steps per epoch (24 samples, batch 8): Trainer's own resume from the final checkpoint
    steps once more; TPOTrainer restores the checkpoint's weights and state and stops."""
    model, processor, dataset, tmp_path = setup
    collator = TPODataCollator(processor, media_loader=fake_media)
    common = dict(max_steps=5, save_strategy="steps", save_steps=5, llm_training="full", per_device_train_batch_size=8)
    TPOTrainer(model=model, args=make_args(tmp_path, "joint", **common), train_dataset=dataset,
               data_collator=collator).train()
    checkpoint = tmp_path / "out-joint" / "checkpoint-5"
    saved = TPOForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    for value in model.state_dict().values():  # scramble: only the restore can bring the weights back
        if value.is_floating_point():
            value.normal_()
    logs = LogCollector()
    resumed = TPOTrainer(model=model, args=make_args(tmp_path, "joint", **common), train_dataset=dataset,
                         data_collator=collator, callbacks=[logs])
    output = resumed.train(resume_from_checkpoint=True)
    assert output.global_step == resumed.state.global_step == 5 and not _losses(logs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_non_finite_loss_names_step_term_and_samples(setup):
    model, processor, dataset, tmp_path = setup
    with torch.no_grad():
        model.region_head.fc2.bias.fill_(float("nan"))
    trainer = TPOTrainer(model=model, args=make_args(tmp_path, "task"), train_dataset=dataset,
                         data_collator=TPODataCollator(processor, media_loader=fake_media))
    with pytest.raises(NonFiniteLossError, match=r"step 0: term\(s\) \['region'.*on samples \['s"):
        trainer.train()


def test_labels_all_ignored_say_so_instead_of_blaming_the_learning_rate(setup):
    model, processor, dataset, tmp_path = setup
    text_only = dataset.filter(lambda row: row["task_label"] == 0)  # every sample only has the LM term
    no_labels = text_only.map(lambda row: {"labels": [-100] * len(row["labels"])})
    trainer = TPOTrainer(model=model, args=make_args(tmp_path, "joint", llm_training="full"), train_dataset=no_labels,
                         data_collator=TPODataCollator(processor, media_loader=fake_media))
    with pytest.raises(NonFiniteLossError, match=r"term\(s\) \['lm'.*Every label of this batch is -100") as error:
        trainer.train()
    assert "learning rate" not in str(error.value)


def test_broken_media_is_skipped_counted_and_training_goes_on(setup):
    model, processor, dataset, tmp_path = setup
    rows = training_samples(8)
    rows[4]["media_path"] = "broken.png"
    encoded = encode_dataset(Dataset.from_list(rows), processor)
    logs = LogCollector()
    TPOTrainer(model=model, args=make_args(tmp_path, "joint", llm_training="full", max_steps=2),
               train_dataset=encoded, data_collator=TPODataCollator(processor, media_loader=fake_media),
               callbacks=[logs]).train()
    skipped = [entry["data/skipped_samples"] for entry in logs.logs if "data/skipped_samples" in entry]
    assert skipped[-1] == 1.0


def test_invalid_samples_are_dropped_by_encode(setup, caplog):
    _, processor, _, _ = setup
    rows = training_samples(3)
    rows[1]["spans_seconds"] = [[6.0, 12.0]]  # past the 8 s video
    with caplog.at_level("WARNING"):
        encoded = encode_dataset(Dataset.from_list(rows), processor)
    assert len(encoded) == 2 and "s1" not in encoded["sample_id"]
    assert "Dropping sample 's1'" in caplog.text and "invalid for a video of 8.000 s" in caplog.text
    with pytest.raises(ValueError, match="invalid for a video"):
        encode_dataset(Dataset.from_list(rows), processor, strict=True, load_from_cache_file=False)
    first = encode_dataset(Dataset.from_list(training_samples(3)), processor)
    again = encode_dataset(Dataset.from_list(training_samples(3)), processor)
    assert first._fingerprint == again._fingerprint
    assert json.loads(first[0]["media_plan"])["kind"] == "image"


def _scalar_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_tensorboard_gets_every_term_and_evaluate_adds_task_metrics(setup):
    """report_to tensorboard writes each loss term under its own tag; evaluate() runs the task evaluator."""
    model, processor, dataset, tmp_path = setup
    calls = []

    def task_evaluator(tpo_model):
        calls.append(type(tpo_model).__name__)
        return {"region/acc@0.5": 0.25, "router/accuracy": 1.0, "temporal/miou": float("nan")}

    # transformers 5.x has no `logging_dir`: TensorBoard writes under output_dir/runs/
    args = make_args(tmp_path, "joint", llm_training="full", report_to=["tensorboard"], max_steps=2)
    trainer = TPOTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(4)),
                         data_collator=TPODataCollator(processor, media_loader=fake_media),
                         task_evaluator=task_evaluator)
    trainer.train()
    metrics = trainer.evaluate()
    assert calls == ["TPOForConditionalGeneration"]
    assert metrics["eval_region/acc@0.5"] == 0.25 and "eval_temporal/miou" not in metrics  # NaN is left out
    assert {"eval_loss", "eval_loss/lm", "eval_loss/region"} <= set(metrics)
    trainer.accelerator.end_training()
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "tb_writer") and callback.tb_writer is not None:
            callback.tb_writer.flush()
    tags = _scalar_tags(tmp_path / "out-joint" / "runs")
    assert {"train/loss", "train/loss/lm", "train/loss/assign", "train/loss/region", "train/loss/temporal",
            "train/loss/region_l1", "train/data/skipped_samples"} <= tags
    assert "eval/region/acc@0.5" in tags


def test_task_stage_that_trains_the_llm_keeps_the_router_and_lm_terms(setup):
    """With task_stage_trains_llm the task stage also trains the router with the LM and assign terms, so
    stage 1's routing follows the changing LLM; without it, neither counts."""
    model, processor, dataset, tmp_path = setup
    collator = TPODataCollator(processor, media_loader=fake_media)
    plain = TPOTrainer(model=model, args=make_args(tmp_path, "task", llm_training="full"), train_dataset=dataset,
                       data_collator=collator)
    assert plain.stage_loss_weights["lm"] == 0.0 and plain.stage_loss_weights["assign"] == 0.0
    assert "router" not in plain.trainable_per_group and "llm" not in plain.trainable_per_group
    logs = LogCollector()
    guarded = TPOTrainer(model=model, args=make_args(tmp_path, "task", llm_training="full", task_stage_trains_llm=True),
                         train_dataset=dataset, data_collator=collator, callbacks=[logs])
    assert guarded.stage_loss_weights["lm"] == 1.0 and guarded.stage_loss_weights["assign"] == 1.0
    assert {"router", "llm", "task_heads", "task_tokens"} <= set(guarded.trainable_per_group)
    router_before = model.router.state_dict()
    router_before = {k: v.clone() for k, v in router_before.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    guarded.train()
    assert any(not torch.equal(v, model.router.state_dict()[k]) for k, v in router_before.items())
    # what trains is exactly the stage's groups: every parameter of another group (the vision tower) is as it was
    frozen = {n for n in before if parameter_group(n) not in guarded.trainable_per_group}
    assert any(parameter_group(n) == "vision" for n in frozen)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in frozen)
    assert any({"loss/lm", "loss/assign", "loss/region"} <= set(entry) for entry in logs.logs)
