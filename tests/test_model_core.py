"""Model core: config, task tokens, router, region head, losses, gradients, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_inputs import SampleSpec, build_model, make_batch
from transformers import LlavaForConditionalGeneration

from tpo import TPOConfig, TPOForConditionalGeneration
from tpo.modeling_tpo.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config

@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return build_model("llava")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def test_config_validates_and_round_trips(llava):
    model, _ = llava
    config = model.config
    restored = TPOConfig.from_dict(json.loads(config.to_json_string()))
    assert restored.to_dict() == config.to_dict()
    assert restored.get_text_config().hidden_size == config.mllm_config.text_config.hidden_size
    assert config.tasks == ["temporal", "region"]
    assert config.region_head_config == {"mode": "mlp", "hidden_ratio": 0.5, "l1_weight": 2.0, "giou_weight": 0.2,
                                         "heatmap_dim": 256, "heatmap_weight": 1.0, "box_format": "cxcywh_sigmoid",
                                         "l1_reduction": "coordinate_sum", "heatmap_score": "additive",
                                         "query_text": False}
    with pytest.raises(ValueError, match=r"valid tasks are \['temporal', 'region', 'mask'\]"):
        TPOConfig(mllm_config=config.mllm_config, tasks=["region", "depth"])
    with pytest.raises(ValueError, match="Unknown key"):
        TPOConfig(mllm_config=config.mllm_config, region_head_config={"l1_wieght": 1.0})
    with pytest.raises(ValueError, match="num_task_tokens"):
        TPOConfig(mllm_config=config.mllm_config, tasks=["region"], num_task_tokens=0)


def test_heads_exist_only_for_enabled_tasks():
    model, _ = build_model("llava", tasks=("temporal",))
    assert model.region_head is None
    assert set(model.task_tokens.embeddings) == {"temporal"}
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("region_head") for n in names)


def test_from_mllm_keeps_weights_and_adds_tokens_at_the_mean():
    tokenizer = build_tiny_tokenizer()
    mllm = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))
    before = {k: v.clone() for k, v in mllm.state_dict().items()}
    old_rows = before["model.language_model.embed_tokens.weight"].shape[0]
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=["region"], tokenizer=tokenizer, num_task_tokens=2)
    after = model.mllm.state_dict()
    for key, value in before.items():
        if "embed_tokens" in key or "lm_head" in key:
            torch.testing.assert_close(after[key][:old_rows], value)
        else:
            assert torch.equal(after[key], value), key
    embeddings = after["model.language_model.embed_tokens.weight"]
    assert embeddings.shape[0] == old_rows + 9  # 3 tasks x (1 begin + 2 slots)
    torch.testing.assert_close(embeddings[old_rows:], before["model.language_model.embed_tokens.weight"].mean(0).expand(9, -1))
    ids = model.config.task_token_ids
    assert tokenizer.convert_ids_to_tokens(ids["region"]["slots"]) == ["<boxes>", "<boxes_1>"]
    assert tokenizer.convert_tokens_to_ids("<time_begin>") == ids["temporal"]["begin"]


# ------------------------------------------------------------------------------------------------
# Forward, losses, gradients
# ------------------------------------------------------------------------------------------------
def test_loss_is_weighted_sum_and_terms_match_reference(llava):
    model, tokenizer = llava
    model.config.loss_weights = {**model.config.loss_weights, "assign": 0.7, "region": 1.3}
    batch = make_batch(tokenizer, model.config, [SampleSpec(task="region"), SampleSpec(task=None, visual="none"),
                                                 SampleSpec(task="region", num_queries=2)])
    out = model(**batch)
    w = model.config.loss_weights
    expected = w["lm"] * out.lm_loss + w["assign"] * out.assign_loss + w["region"] * out.region_loss
    torch.testing.assert_close(out.loss, expected)
    # the router loss is plain cross-entropy on the returned logits
    torch.testing.assert_close(out.assign_loss, F.cross_entropy(out.router_logits.float(), batch["task_labels"]))
    # the LM loss is the shifted token cross-entropy over answer tokens
    shift_logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(shift_logits, batch["labels"][:, 1:].reshape(-1)))
    # region terms recomputed by hand from the predicted boxes
    assert out.pred_boxes.shape == (3, 4) and out.pred_boxes_batch_index.tolist() == [0, 2, 2]
    target = batch["region_boxes"]
    hidden = model.mllm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   pixel_values=batch["pixel_values"]).last_hidden_state
    slot = model.config.task_token_ids["region"]["slots"][0]
    b, p = (batch["input_ids"] == slot).nonzero(as_tuple=True)
    pred = model.region_head(hidden[b, p][:, None])
    l1 = (pred - box_xyxy_to_cxcywh(target)).abs().sum(-1).mean()
    torch.testing.assert_close(out.loss_dict["region_l1"], l1.detach())
    torch.testing.assert_close(out.region_loss, _region_loss(pred, target))
    model.config.loss_weights = {**model.config.loss_weights, "assign": 1.0, "region": 1.0}


def _region_loss(pred_boxes_cxcywh, target_boxes_xyxy):
    """The region head's loss by hand: 2 x L1 on (cx, cy, w, h) + 0.2 x (1 - GIoU), means over boxes."""
    l1 = (pred_boxes_cxcywh - box_xyxy_to_cxcywh(target_boxes_xyxy)).abs().sum(-1).mean()
    giou = (1 - generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes_cxcywh), target_boxes_xyxy)).mean()
    return 2.0 * l1 + 0.2 * giou


def test_output_shapes(llava):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(), SampleSpec(task=None)])
    out = model(**batch)
    batch_size, seq_len = batch["input_ids"].shape
    assert out.logits.shape == (batch_size, seq_len, model.config.get_text_config().vocab_size)
    assert out.router_logits.shape == (batch_size, 4)
    # disabled task (mask) can never be picked
    assert (out.router_logits.argmax(-1) != 3).all()
    assert out.pred_boxes.shape == (1, 4) and ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    assert set(out.loss_dict) == {"lm", "assign", "region", "region_l1", "region_giou"}


def test_gradients_reach_task_parts_and_not_frozen_parts(llava):
    model, tokenizer = llava
    model.zero_grad()
    vision = model.mllm.model.vision_tower
    vision.requires_grad_(False)
    batch = make_batch(tokenizer, model.config, [SampleSpec(task="region"), SampleSpec(task=None)])
    model(**batch).loss.backward()
    assert model.task_tokens.embeddings["region"].grad.abs().sum() > 0
    assert model.task_tokens.embeddings["temporal"].grad is not None  # present (zero): DDP-safe
    assert model.router.classifier.weight.grad.abs().sum() > 0
    assert model.region_head.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vision.parameters())
    vision.requires_grad_(True)
    model.zero_grad()


def test_batch_without_region_gives_zero_region_loss_but_gradients(monkeypatch):
    """Under data parallelism an idle head gets exact zero gradients (DDP needs no find_unused_parameters);
    a single process leaves it out of the graph (cheaper), with the same loss."""
    from tpo.modeling_tpo import modeling_tpo

    model, tokenizer = build_model("llava")
    batch = make_batch(tokenizer, model.config, [SampleSpec(task=None), SampleSpec(task=None, visual="none")])
    single = model(**batch)
    single.loss.backward()
    assert all(p.grad is None for p in model.region_head.parameters())
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(modeling_tpo, "_unused_heads_need_gradients", lambda: True)
    out = model(**batch)
    assert out.region_loss is None and "region" not in out.loss_dict  # no region sample: no term
    assert out.loss.item() == single.loss.item()
    out.loss.backward()
    grads = [p.grad for p in model.region_head.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)


def test_task_token_replaces_slot_embedding(llava):
    model, tokenizer = llava
    slot = model.config.task_token_ids["region"]["slots"][0]
    ids = torch.tensor([[5, slot, 7]])
    embedded = model.get_input_embeddings()(ids)
    torch.testing.assert_close(embedded[0, 1], model.task_tokens.embeddings["region"][0])
    torch.testing.assert_close(embedded[0, 0], model.get_input_embeddings().weight[5])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("visual", ["image", "video"])
def test_backbone_families_with_images_and_video(family, visual):
    model, tokenizer = build_model(family)
    specs = [SampleSpec(visual=visual, task="region", num_frames=4), SampleSpec(visual=visual, task=None, num_frames=2)]
    batch = make_batch(tokenizer, model.config, specs, family=family)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    w = model.config.loss_weights
    torch.testing.assert_close(out.loss, w["lm"] * out.lm_loss + w["assign"] * out.assign_loss + w["region"] * out.region_loss)
    torch.testing.assert_close(out.assign_loss, F.cross_entropy(out.router_logits.float(), batch["task_labels"]))
    assert out.pred_boxes.shape == (1, 4)
    out.loss.backward()
    assert model.task_tokens.embeddings["region"].grad.abs().sum() > 0


def test_bf16_forward_on_cpu():
    model, tokenizer = build_model("llava")
    batch = make_batch(tokenizer, model.config, [SampleSpec()])
    with torch.no_grad():
        full = model(**batch)
    model.to(torch.bfloat16)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    assert out.pred_boxes.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    # the same model in float32: the same loss and boxes up to bfloat16's precision
    torch.testing.assert_close(out.loss, full.loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.pred_boxes.float(), full.pred_boxes, rtol=0, atol=2e-2)


def test_gradient_checkpointing_matches_plain_backward():
    model, tokenizer = build_model("llava")
    batch = make_batch(tokenizer, model.config, [SampleSpec(), SampleSpec(task=None)])
    model.train()
    for module in model.modules():  # dropout-free comparison
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain = model(**batch).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.mllm.model.language_model.gradient_checkpointing
    checkpointed = model(**batch).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_slot_token_of_disabled_task_is_refused(llava):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(task=None), SampleSpec(task=None)])
    mask_slot = model.config.task_token_ids["mask"]["slots"][0]
    batch["input_ids"][1, 3] = mask_slot
    with pytest.raises(ValueError, match=r"Sample\(s\) \[1\] contain the token <masks>.*does not enable"):
        model(**batch)


def test_slot_and_target_count_mismatch_names_sample(llava):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(task="region"), SampleSpec(task="region", num_queries=2)])
    batch["region_boxes"] = batch["region_boxes"][:2]
    batch["region_batch_index"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"Sample 1 has 2 region slot\(s\) \(<boxes>\) but 1 region target"):
        model(**batch)


@pytest.mark.parametrize("box", [[0.5, 0.2, 0.4, 0.6], [0.1, 0.2, 1.4, 0.6], [-0.2, 0.0, 0.5, 0.5]])
def test_invalid_target_box_is_refused(llava, box):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(task=None), SampleSpec(task="region")])
    batch["region_boxes"] = torch.tensor([box])
    with pytest.raises(ValueError, match=r"Region target 0 \(sample 1\).*within \[0, 1\] with x0 <= x1"):
        model(**batch)


def test_nan_target_box_is_refused(llava):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(task="region")])
    batch["region_boxes"] = torch.tensor([[0.1, float("nan"), 0.5, 0.6]])
    with pytest.raises(ValueError, match=r"Region target 0 \(sample 0\)"):
        model(**batch)


def test_region_targets_out_of_sample_order_are_matched_to_their_slots(llava):
    model, tokenizer = llava
    model.eval()
    specs = [SampleSpec(task="region"), SampleSpec(task=None), SampleSpec(task="region", num_queries=2)]
    batch = make_batch(tokenizer, model.config, specs)
    ordered = model(**batch)
    # the same targets listed sample 2 first: matched back to (sample, position) order, same losses
    permutation = torch.tensor([1, 2, 0])
    shuffled = {**batch, "region_boxes": batch["region_boxes"][permutation],
                "region_batch_index": batch["region_batch_index"][permutation]}
    again = model(**shuffled)
    torch.testing.assert_close(again.loss_dict["region"], ordered.loss_dict["region"])
    # a wrong order without the batch index would pair boxes with other slots: the loss changes
    swapped = {**batch, "region_boxes": batch["region_boxes"][permutation]}
    swapped.pop("region_batch_index")
    assert not torch.allclose(model(**swapped).loss_dict["region"], ordered.loss_dict["region"])
    # ... exactly the loss of the slots' boxes against the targets in the listed order
    pred = box_xyxy_to_cxcywh(ordered.pred_boxes)  # (3, 4), the slots in (sample, position) order
    torch.testing.assert_close(model(**swapped).loss_dict["region"], _region_loss(pred, batch["region_boxes"][permutation]))
    torch.testing.assert_close(ordered.loss_dict["region"], _region_loss(pred, batch["region_boxes"]))
    model.train()


def test_router_loss_ignores_unlabelled_samples_and_is_zero_without_labels(llava):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(task="region"), SampleSpec(task=None)])
    batch["task_labels"] = torch.tensor([2, -100])
    out = model(**batch)
    torch.testing.assert_close(out.assign_loss, F.cross_entropy(out.router_logits[:1].float(), torch.tensor([2])))
    batch["task_labels"] = torch.tensor([-100, -100])
    model.zero_grad()
    out = model(**batch)
    assert out.assign_loss.item() == 0.0 and torch.isfinite(out.loss)
    w = model.config.loss_weights  # the loss is the other terms alone
    torch.testing.assert_close(out.loss, w["lm"] * out.lm_loss + w["region"] * out.region_loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.router.parameters())


@pytest.mark.parametrize("label", [3, 7, -1])
def test_unknown_task_label_is_refused(llava, label):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(task=None), SampleSpec(task=None)])
    batch["task_labels"] = torch.tensor([0, label])
    with pytest.raises(ValueError, match=rf"Sample 1 has task label {label}; valid labels .*0 \(text\)"):
        model(**batch)


def test_image_token_mismatch_names_the_sample(llava):
    model, tokenizer = llava
    batch = make_batch(tokenizer, model.config, [SampleSpec(task=None), SampleSpec(task=None), SampleSpec(task=None)])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    row = batch["input_ids"][2]
    row[(row == image_id).nonzero()[0]] = tokenizer.convert_tokens_to_ids("<|end|>")
    with pytest.raises(ValueError, match=r"image placeholder tokens per sample: \[16, 16, 15\]; sample\(s\) \[2\]"):
        model(**batch)
