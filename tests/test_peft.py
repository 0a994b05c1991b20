"""peft LoRA on the language model with the TPO modules in `modules_to_save`: gradients, save and
reload, merge_and_unload."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_inputs import (
    MASK_IMAGE,
    MASK_VIDEO,
    MEDIA,
    REGION,
    TEMPORAL,
    SampleSpec,
    build_model,
    build_model_and_processor,
    make_batch,
)

from tpo import TPOForConditionalGeneration


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.router_logits, out.pred_boxes


def test_lora_train_save_reload_and_merge(tmp_path):
    model, tokenizer = build_model("llava")
    model.save_pretrained(tmp_path / "base")
    initial_head = model.region_head.fc1.weight.detach().clone()
    initial_tokens = model.task_tokens.embeddings["region"].detach().clone()
    regex = model.lora_target_regex()
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=regex, modules_to_save=model.task_module_names())
    peft_model = get_peft_model(model, lora_config)

    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    assert not any("vision_tower" in n for n in lora_names)

    batch = make_batch(tokenizer, model.config, [SampleSpec(task="region"), SampleSpec(task=None)])
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = peft_model(**batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
        assert grads[next(n for n in grads if "modules_to_save" in n and "region_head" in n)].abs().sum() > 0
        assert grads[next(n for n in grads if "modules_to_save" in n and "task_tokens" in n)] is not None
        frozen = dict(peft_model.named_parameters())
        assert all(frozen[n].grad is None for n in frozen if "embed_tokens" in n)
        optimizer.step()
        optimizer.zero_grad()

    expected = _outputs(peft_model, batch)
    trained = peft_model.base_model.model
    trained_head = trained.region_head.modules_to_save["default"].fc1.weight.detach().clone()
    trained_tokens = trained.task_tokens.modules_to_save["default"].embeddings["region"].detach().clone()
    peft_model.save_pretrained(tmp_path / "adapter")

    base = TPOForConditionalGeneration.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    for got, want in zip(_outputs(reloaded, batch), expected):
        torch.testing.assert_close(got, want)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, TPOForConditionalGeneration)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    for got, want in zip(_outputs(merged, batch), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the trained (not the original) task tokens and heads survive the merge
    assert not torch.equal(merged.region_head.fc1.weight, initial_head)
    assert not torch.equal(merged.task_tokens.embeddings["region"], initial_tokens)
    torch.testing.assert_close(merged.region_head.fc1.weight, trained_head, rtol=0, atol=0)
    torch.testing.assert_close(merged.task_tokens.embeddings["region"], trained_tokens, rtol=0, atol=0)
    merged.save_pretrained(tmp_path / "merged")
    final = TPOForConditionalGeneration.from_pretrained(tmp_path / "merged")
    for got, want in zip(_outputs(final, batch), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_trains_every_head_with_mask_prompts_wrapped():
    """With all three heads in `modules_to_save` (peft wraps e.g. the mask head's prompt MLP), a mixed
    region / temporal / video-mask / image-mask batch trains: every head's saved copy gets a gradient."""

    from tpo.processing.collator_tpo import collate_encoded

    model, processor = build_model_and_processor("llava")
    names = model.task_module_names()
    assert "mask_head.prompt_mlp" in names
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=model.lora_target_regex(), modules_to_save=names)
    peft_model = get_peft_model(model, lora).train()
    samples = [REGION, TEMPORAL, MASK_VIDEO, MASK_IMAGE]
    encoded = [processor.encode(s, mode="train") for s in samples]
    batch = collate_encoded(processor, encoded, [MEDIA[s["id"]] for s in samples], padding_side="right")
    batch.pop("tpo_meta")
    out = peft_model(**batch)
    assert {"region", "temporal", "mask"} <= set(out.loss_dict)
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for head in ("region_head", "temporal_head", "mask_head.prompt_mlp"):
        saved = [g for n, g in grads.items() if head in n and "modules_to_save" in n]
        assert saved and all(g is not None for g in saved), head
        assert sum(float(g.abs().sum()) for g in saved) > 0, head
