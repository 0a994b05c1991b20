"""The `release` preset: the released heads' loss terms against hand computations with the release's formulas
(REFERENCE.md section 2), SAM2 frozen with only the prompt-embedding and box L1s, the paper's stage schedule, and
the settings that name a preset."""

import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tpo import TPOForConditionalGeneration
from tpo.modeling_tpo.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from tpo.modeling_tpo.configuration_tpo import DEFAULT_REGION_HEAD, DEFAULT_TEMPORAL_HEAD, PRESETS, TPOConfig
from tpo.modeling_tpo.mask_head import MaskHead
from tpo.modeling_tpo.matcher import SpanHungarianMatcher
from tpo.modeling_tpo.region_head import RegionHead
from tpo.modeling_tpo.temporal_loss import TemporalCriterion
from tpo.training.arguments import TPOTrainingArguments
from tpo.training.stages import apply_stage, lr_multipliers, stage_runs
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_sam2_config

RELEASE_TEMPORAL = {k: PRESETS["release"]["temporal_head_config"][k]
                    for k in ("span_l1_reduction", "label_reduction", "saliency_loss", "eos_coef", "saliency_margin")}
TAU = 0.5  # the release's rank-contrastive temperature


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------
def test_an_unknown_preset_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown `preset` 'relase'; valid presets are \['release'\]"):
        TPOConfig(tasks=["region"], preset="relase")
    with pytest.raises(ValueError, match=r"Unknown `preset` 'paper'"):
        TPOTrainingArguments(output_dir=str(tmp_path), preset="paper", report_to=[])


def test_release_preset_fills_the_released_settings_under_the_callers_and_round_trips():
    config = TPOConfig(tasks=["temporal", "region", "mask"], preset="release", region_head_config={"l1_weight": 1.0},
                       sam2_config=tiny_sam2_config())
    assert config.region_head_config["box_format"] == "xyxy_raw" and config.region_head_config["l1_weight"] == 1.0
    assert config.temporal_head_config["num_dummies"] == 45 and config.temporal_head_config["input_dropout"] == 0.5
    assert config.temporal_head_config["dense_clip_seconds"] == 2.0
    assert config.mask_head_config["freeze_mask_decoder"] and config.mask_head_config["bce_weight"] == 0.0
    assert config.loss_weights == {"lm": 1.0, "assign": 0.0, "temporal": 0.05, "region": 1.0, "mask": 1.0}
    reloaded = TPOConfig.from_dict(config.to_dict())
    assert reloaded.preset == "release" and reloaded.region_head_config == config.region_head_config
    assert reloaded.temporal_head_config == config.temporal_head_config
    default = TPOConfig(tasks=["region"])  # the project's own choices stay the default
    assert default.preset is None and default.region_head_config == DEFAULT_REGION_HEAD
    assert default.temporal_head_config == DEFAULT_TEMPORAL_HEAD and default.loss_weights["assign"] == 1.0


# ------------------------------------------------------------------------------------------------------------
# Region: raw xyxy, 2 x mean over N x 4 L1 + mean GIoU / 5
# ------------------------------------------------------------------------------------------------------------
def test_release_region_head_regresses_raw_xyxy():
    torch.manual_seed(0)
    head = RegionHead(16, box_format="xyxy_raw", l1_reduction="mean")
    embeddings = torch.randn(3, 1, 16)
    raw = head.fc2(head.act(head.fc1(embeddings.mean(1))))
    torch.testing.assert_close(box_cxcywh_to_xyxy(head(embeddings)), raw)  # no sigmoid, (x0, y0, x1, y1)
    with pytest.raises(ValueError, match="box_format 'xyxy_raw' is the released MLP's"):
        RegionHead(16, mode="heatmap", box_format="xyxy_raw")


def test_release_region_loss_hand_computed():
    head = RegionHead(16, box_format="xyxy_raw", l1_reduction="mean", l1_weight=2.0, giou_weight=0.2)
    predicted_xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.4, 0.9]])
    target_xyxy = torch.tensor([[0.0, 0.2, 0.4, 0.7], [0.3, 0.2, 0.6, 0.8]])
    terms = head.loss(box_xyxy_to_cxcywh(predicted_xyxy), target_xyxy)
    l1 = (0.1 + 0.0 + 0.1 + 0.1 + 0.0 + 0.1 + 0.2 + 0.1) / 8  # mean over N x 4
    # box 1: intersection 0.3 x 0.4 = 0.12, union 0.16 + 0.20 - 0.12 = 0.24, enclosing 0.5 x 0.5 = 0.25
    giou_1 = 0.12 / 0.24 - (0.25 - 0.24) / 0.25
    # box 2: intersection 0.1 x 0.6 = 0.06, union 0.08 + 0.18 - 0.06 = 0.20, enclosing 0.3 x 0.8 = 0.24
    giou_2 = 0.06 / 0.20 - (0.24 - 0.20) / 0.24
    giou_loss = ((1 - giou_1) + (1 - giou_2)) / 2
    # float32, and the raw box passes through (cx, cy, w, h) and back: agreement to ~1e-7, not bit for bit
    assert terms["region_l1"].item() == pytest.approx(l1, abs=1e-6)
    assert terms["region_giou"].item() == pytest.approx(giou_loss, abs=1e-6)
    assert terms["region"].item() == pytest.approx(2 * l1 + giou_loss / 5, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Temporal: span L1 mean over matched spans x 2, CE plain mean over B x Q, saliency terms, x 0.05
# ------------------------------------------------------------------------------------------------------------
def release_criterion(**overrides) -> TemporalCriterion:
    return TemporalCriterion(SpanHungarianMatcher(10.0, 1.0, 4.0), **{**RELEASE_TEMPORAL, **overrides})


def test_release_span_l1_and_label_ce_hand_computed():
    criterion = release_criterion()
    # two samples alike: moment 0 matches [0.2, 0.6] (cw (0.4, 0.4)) shifted by 0.1, moment 1 is no object
    spans = torch.tensor([[[0.5, 0.4], [0.9, 0.1]]]).repeat(2, 1, 1)
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]).repeat(2, 1, 1)
    targets = [{"spans": torch.tensor([[0.2, 0.6]])}] * 2
    terms = criterion.span_terms({"pred_spans": spans, "pred_logits": logits}, targets, torch.tensor(2.0))
    assert terms["span_l1"].item() == pytest.approx((0.1 + 0.0) * 2 / 4, abs=1e-6)  # mean over 2 spans x 2 coordinates
    assert terms["span_giou"].item() == pytest.approx(1 - 0.6, abs=1e-6)  # overlap 0.3, union 0.5, enclosing 0.5
    foreground = -math.log(math.exp(2) / (math.exp(2) + 1))  # matched: class 0, weight 1
    no_object = -math.log(math.e / (math.e + 1))  # unmatched: class 1, weight 0.1
    assert terms["label"].item() == pytest.approx(2 * (foreground + 0.1 * no_object) / 4, rel=1e-6)  # over B x Q


SCORES = [0.1, 0.5, -0.2, 0.3, 0.0, 0.8]


def hinge(positive: float, negative: float, margin: float = 0.2) -> float:
    return max(0.0, margin + negative - positive)


def contrastive(scores: list[float], labels: list[int], extra: list[float] = ()) -> float:
    """The release's rank-contrastive term of one query, by its loops: levels 1..11, / 12."""
    logits = [s / TAU for s in scores]
    log_norm = math.log(sum(math.exp(z) for z in logits + [e / TAU for e in extra]))
    total = 0.0
    for level in range(1, 12):
        positives = [i for i, label in enumerate(labels) if label >= level]
        if positives:
            total += -sum(logits[i] - log_norm for i in positives) / len(positives)
    return total / 12


def test_release_saliency_graded_targets_hand_computed():
    labels = [0, 3, 6, 12, 0, 0]  # summed scores of three annotators
    targets = [{"spans": None, "saliency": torch.tensor([label / 12 for label in labels])}]
    value = release_criterion().saliency.term(torch.tensor([SCORES]), torch.ones(1, 6, dtype=torch.bool), targets)
    hard = hinge(SCORES[3], SCORES[1])  # the highest (12) against the lowest (3) relevant clip
    easy = sum(hinge(SCORES[i], SCORES[j]) for i in (1, 2, 3) for j in (0, 4, 5)) / 9  # relevant vs irrelevant
    assert value.item() == pytest.approx(hard + easy + contrastive(SCORES, labels), rel=1e-5)


def test_release_saliency_windows_only_with_a_negative_pair_hand_computed():
    labels = [0, 12, 12, 0, 0, 0]  # binary targets (from a window): inside = 1
    negative = [0.2, -0.1, 0.4, 0.0, 0.3, -0.5]  # the same video's clips with another query
    targets = [{"spans": None, "saliency": torch.tensor([label / 12 for label in labels])}]
    value = release_criterion().saliency.term(torch.tensor([SCORES]), torch.ones(1, 6, dtype=torch.bool), targets,
                                              torch.tensor([negative]), torch.tensor([True]))
    ranking = 2 * sum(hinge(SCORES[i], SCORES[j]) for i in (1, 2) for j in (0, 3, 4, 5)) / 8
    negative_pair = sum(softplus(s) for s in negative)  # -log(1 - sigmoid(s)) summed over clips
    expected = ranking + contrastive(SCORES, labels, negative) + negative_pair
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_release_t2v_relevance_terms_hand_computed_and_the_weighted_sum():
    relevance = [0.1, 0.6, 0.7, 0.2, 0.3, 0.05]
    negative = [0.2, 0.1, 0.3, 0.1, 0.05, 0.4]
    labels = [0, 3, 6, 12, 0, 0]
    targets = [{"spans": torch.tensor([[0.2, 0.6]]), "saliency": torch.tensor([label / 12 for label in labels])}]
    mask = torch.ones(1, 6, dtype=torch.bool)
    criterion = release_criterion(t2v_saliency_weight=1.0, saliency_weight=4.0)
    value = criterion.saliency.term(torch.tensor([relevance]), mask, targets, torch.tensor([negative]),
                                    torch.tensor([True]), probabilities=True)
    hard = hinge(relevance[3], relevance[1])
    easy = sum(hinge(relevance[i], relevance[j]) for i in (1, 2, 3) for j in (0, 4, 5)) / 9
    bce = -sum(math.log(r) if label else math.log(1 - r) for r, label in zip(relevance, labels)) / 6
    negative_pair = -sum(math.log(1 - r) for r in negative)
    expected = hard + easy + contrastive(relevance, labels, negative) + bce + negative_pair
    assert value.item() == pytest.approx(expected, rel=1e-5)
    outputs = {"pred_spans": torch.tensor([[[0.4, 0.4]]]), "pred_logits": torch.tensor([[[3.0, 0.0]]]),
               "pred_saliency": torch.tensor([SCORES]), "pred_t2v_relevance": torch.tensor([relevance]),
               "frame_mask": mask}
    terms = criterion(outputs, targets)
    spans = 10 * terms["temporal_span_l1"] + terms["temporal_span_giou"] + 4 * terms["temporal_label"]
    saliency = 4 * (terms["temporal_saliency"] + 1.0 * terms["temporal_t2v_saliency"])
    assert terms["temporal"].item() == pytest.approx((spans + saliency).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Mask: SAM2 frozen, prompt-embedding L1 + box L1, no mask loss
# ------------------------------------------------------------------------------------------------------------
def test_release_mask_head_freezes_sam2_and_trains_only_the_two_l1s():
    torch.manual_seed(0)
    settings = {k: v for k, v in PRESETS["release"]["mask_head_config"].items()}
    head = MaskHead(32, tiny_sam2_config(), **settings)
    assert not any(p.requires_grad for p in head.sam2.parameters())
    embeddings = torch.randn(2, 1, 32, requires_grad=True)
    out = head(embeddings, sam2_pixel_values=torch.randn(2, 3, 128, 128))
    masks = torch.zeros(2, 128, 128)
    masks[0, 32:64, 16:48] = 1  # box (16, 32, 48, 64) in SAM2 pixels (x1, y1 exclusive); image 1: no object
    terms = head.loss(out, masks)
    with torch.no_grad():
        reference = head.sam2.prompt_encoder._embed_boxes(torch.tensor([[[16.0, 32.0, 48.0, 64.0]]]))[0]
    prompt_l1 = (out["prompt_embeddings"][0] - reference).abs().mean()  # image 1 (empty) takes no part
    box_l1 = (out["pred_boxes_xyxy"][0] - torch.tensor([16.0, 32.0, 48.0, 64.0]) / 128).abs().mean()
    torch.testing.assert_close(terms["mask_prompt_l1"], prompt_l1)
    torch.testing.assert_close(terms["mask_box_l1"], box_l1)
    torch.testing.assert_close(terms["mask"], prompt_l1 + box_l1)  # BCE and Dice weigh 0
    terms["mask"].backward()
    assert embeddings.grad.abs().sum() > 0 and head.box_regressor[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# The paper's stage schedule
# ------------------------------------------------------------------------------------------------------------
def test_release_schedule_per_task_stage_two_and_one_rate_in_stage_three(tmp_path):
    common = dict(output_dir=str(tmp_path), report_to=[], learning_rate=2e-5)
    release = TPOTrainingArguments(preset="release", stage="joint", **common)
    assert release.task_stage_per_task and release.task_stage_trains_llm and release.joint_lr_multipliers is False
    assert set(lr_multipliers(release).values()) == {1.0}  # stage 3: 2e-5 for everything
    task = TPOTrainingArguments(preset="release", stage="task", **common)
    assert lr_multipliers(task)["task_heads"] * task.learning_rate == pytest.approx(1e-4)  # stage 2 heads: 1e-4
    assert lr_multipliers(task)["task_tokens"] * task.learning_rate == pytest.approx(1e-4)
    assert stage_runs(["assign", "task", "joint"], release, ["temporal", "region"]) == [
        ("assign", None), ("task", "temporal"), ("task", "region"), ("joint", None)]
    ours = TPOTrainingArguments(stage="joint", **common)
    assert not ours.task_stage_per_task and lr_multipliers(ours)["task_heads"] == 5.0
    given = TPOTrainingArguments(preset="release", joint_lr_multipliers=True, stage="joint", **common)
    assert lr_multipliers(given)["task_heads"] == 5.0  # what the caller gives wins over the preset


def test_a_per_task_stage_trains_only_its_head_and_token_and_no_router_without_assign_loss(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(tiny_llava_config(tokenizer)),
                                                  tasks=["temporal", "region"], tokenizer=tokenizer, preset="release",
                                                  temporal_head_config={"dense_clip_seconds": 0.0})
    args = TPOTrainingArguments(output_dir=str(tmp_path), report_to=[], preset="release", stage="task",
                                tasks=["region"], llm_training="full")
    apply_stage(model, "task", args, model.config.mask_head_config, {"assign": 0.0, "region": 1.0})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"region_head.fc1.weight", "task_tokens.embeddings.region"} <= trainable
    assert not any(name.startswith(("temporal_head.", "router.")) for name in trainable)
    assert "task_tokens.embeddings.temporal" not in trainable
    assert any(name.startswith("mllm.") for name in trainable)  # stage 2 trains the LLM too (full here, LoRA real)


def test_release_model_with_dense_clips_reloads_as_remote_code(tmp_path):
    """save_pretrained copies every module the release preset uses (the CG-DETR layers among them); the reloaded
    model has the same weights and, on a dense-clip batch, the same outputs (eval mode: no dropout, no negative
    pairs)."""
    from datasets import Dataset
    from transformers import AutoModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tpo.processing.data_collator import TPODataCollator
    from tpo.processing.pipeline import encode_dataset
    from tpo.processing.processing_tpo import TPOProcessor
    from tpo.tiny import random_media

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(tiny_llava_config(tokenizer)), tasks=["temporal", "region"], tokenizer=tokenizer,
        preset="release", temporal_head_config={"d_model": 32, "num_heads": 4, "dim_feedforward": 64, "num_dummies": 5})
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=4)
    rows = [dict(id=f"v{i}", source="test", split="val", media_path=f"v{i}.mp4", query="red square",
                 image_size=[32, 32], conversations=[], boxes_xyxy_pixels=[], spans_seconds=[[2.0, 6.0]],
                 duration_seconds=12.0, media_type="video", task="temporal", saliency_clip_ids=[], saliency_scores=[])
            for i in range(2)]
    batch = TPODataCollator(processor, media_loader=lambda plan, targets: random_media(plan))(
        list(encode_dataset(Dataset.from_list(rows), processor, load_from_cache_file=False)))
    batch.pop("tpo_meta")
    model.eval()
    with torch.no_grad():
        expected = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "temporal_layers.py").exists()
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert loaded.config.preset == "release" and loaded.temporal_head.query_aware is not None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        got = loaded(**batch)
    # float32 rounding of a few ulps: a reloaded tensor's memory alignment can change the GEMM path (see
    # tests/test_remote_code.py)
    for name in ("pred_spans", "pred_saliency", "pred_t2v_relevance"):
        torch.testing.assert_close(got.temporal_outputs[name], expected.temporal_outputs[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_run_tpo_with_preset_release_runs_the_papers_schedule_end_to_end(tmp_path):
    """`--preset release` is the one switch of examples/run_tpo.py: the release heads (dense 2-second clips decoded
    from the synthetic benchmark's mp4s), the task stage once per task, evaluation and a reloadable final model."""
    from script_loader import load_script
    import json
    from pathlib import Path

    import yaml

    from tpo.processing.synthetic import generate_synthetic_benchmark

    root = Path(__file__).resolve().parents[1]
    run_tpo = load_script("examples/run_tpo.py")
    splits = generate_synthetic_benchmark(tmp_path / "synthetic", size="small", seed=0)["splits"]
    data = {"train": list(splits["train"].values()), "test": list(splits["test"].values())}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "run"
    head = {"d_model": 32, "num_heads": 4, "dim_feedforward": 64, "num_dummies": 5}
    metrics = run_tpo.main([
        str(root / "examples" / "configs" / "synthetic_default.yaml"), "--preset", "release",
        "--data_config", str(tmp_path / "data.yaml"), "--output_dir", str(out), "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "0",
        "--disable_tqdm", "true", "--tiny_num_layers", "1", "--num_frames", "4",
        "--temporal_head_config", json.dumps(head), "--region_head_config", "{}", "--mask_head_config", "{}"])
    assert {p.name for p in out.iterdir() if p.name.startswith("stage-")} == {
        "stage-assign", "stage-task-temporal", "stage-task-region", "stage-task-mask", "stage-joint"}
    assert "temporal/r1@0.5" in metrics and "highlight/hit@1" in metrics
    config = json.loads((out / "final" / "config.json").read_text(encoding="utf-8"))
    assert config["preset"] == "release" and config["temporal_head_config"]["dense_clip_seconds"] == 2.0
    assert config["region_head_config"]["box_format"] == "xyxy_raw" and config["loss_weights"]["assign"] == 0.0
