"""What only shows at real scale: the published configurations, their 152k-row vocabularies, bf16 heads, the
task-token hook and save/reload at the real widths (LLM and vision tower cut to one layer, a few tokens), and the
fixes those shapes called for (task tokens inside a padded vocabulary, frozen vision towers under gradient
checkpointing, LM logits on the labelled positions only)."""

import gc
from pathlib import Path

import pytest
import torch
from tiny_inputs import SampleSpec, make_batch, weighted_loss
from transformers import LlavaForConditionalGeneration

from script_loader import load_script
from tpo import TPOForConditionalGeneration
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scale():
    """benchmarks/bench_scale.py as a module (the published configurations and builders live there)."""
    return load_script("benchmarks/bench_scale.py")


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def _task_token_ids(config) -> list[int]:
    return [i for entry in config.task_token_ids.values() for i in [entry["begin"], *entry["slots"]]]


def _mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Reference: float64 mean of weight[:rows], 4096 rows at a time (no full-size copy of a 152k-row matrix)."""
    total = sum(weight[i:min(i + 4096, rows)].double().sum(0) for i in range(0, rows, 4096))
    return total / rows


def _assert_mean_rows(actual: torch.Tensor, weight_before: torch.Tensor, rows: int) -> None:
    """`actual` (n, hidden) rows equal the mean of the first `rows` rows. The model sums in float32, the reference in
    float64: they differ by at most the float32 summation error, rows x 2^-24 x mean|w| / rows per element (the
    recursive-summation bound; the mean is far smaller than the elements, so a relative bound would not hold), plus
    one rounding to the weights' dtype (2^-8 relative in bf16)."""
    expected = _mean_rows(weight_before, rows)
    magnitude = sum(weight_before[i:min(i + 4096, rows)].double().abs().sum() for i in range(0, rows, 4096)) / rows
    rounding = 2.0**-8 if actual.dtype == torch.bfloat16 else 2.0**-24
    bound = rows * 2.0**-24 * magnitude / weight_before.shape[1] + rounding * expected.abs()
    assert bool(((actual.double() - expected).abs() <= bound).all()), (actual.double() - expected).abs().max()


# ------------------------------------------------------------------------------------------------
# Published configurations (meta device: no memory, no initialisation)
# ------------------------------------------------------------------------------------------------
# Parameter counts of the published checkpoints (their model cards / safetensors index), in billions.
PUBLISHED_BILLIONS = {"qwen2.5-vl-7b": 8.29, "llava-onevision-7b": 8.03, "llava-1.5-7b": 7.06}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_published_configurations_build_the_published_sizes(scale, name):
    count = scale.published_parameter_count(name)
    assert abs(count / 1e9 - PUBLISHED_BILLIONS[name]) < 0.01, count  # model cards round to 0.01 B


def test_sam2_1_hiera_tiny_configuration_has_the_published_size(scale):
    from transformers import Sam2VideoModel

    with torch.device("meta"):
        sam2 = Sam2VideoModel(scale.sam2_config())
    assert abs(sum(p.numel() for p in sam2.parameters()) / 1e6 - scale.SAM2_1_HIERA_TINY_PARAMS_M) < 0.1
    assert sam2.config.image_size == 1024


@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "llava-onevision-7b", "llava-1.5-7b"])
def test_stand_in_tokenizer_has_the_real_ids(scale, name):
    tokenizer = scale.stand_in_tokenizer(name)
    spec = scale.PUBLISHED[name]["tokenizer"]
    assert len(tokenizer) == spec["base_vocab"] + len([t for t in spec["added"] if t not in spec["leading"]])
    config = scale.PUBLISHED[name]["config"]
    image_id = config.get("image_token_id", config.get("image_token_index"))
    image_token = {"qwen2.5-vl-7b": "<|image_pad|>"}.get(name, "<image>")
    assert tokenizer.convert_tokens_to_ids(image_token) == image_id
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                              "text": "where is the red circle"}]}], tokenize=False)
    assert image_id in tokenizer(rendered).input_ids


# ------------------------------------------------------------------------------------------------
# Fixes, on tiny models
# ------------------------------------------------------------------------------------------------
def test_task_tokens_inside_a_padded_vocabulary_take_the_vocabulary_mean():
    """Qwen's embeddings have 152,064 rows for 151,665 tokens: the task tokens land in untrained padding rows,
    which must be set like resized rows (they kept whatever the checkpoint had there)."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_config(tokenizer)
    config.text_config.vocab_size = len(tokenizer) + 64  # padded, as Qwen2 / Qwen2.5 checkpoints are
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    mllm = LlavaForConditionalGeneration(config)
    known = len(tokenizer)
    before = {"in": mllm.get_input_embeddings().weight.detach().clone(),
              "out": mllm.get_output_embeddings().weight.detach().clone()}
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=["region"], tokenizer=tokenizer)
    ids = _task_token_ids(model.config)
    assert ids == list(range(known, known + 6))  # inside the existing rows: no resize
    for key, embedding in (("in", model.get_input_embeddings()), ("out", model.get_output_embeddings())):
        weight = embedding.weight.detach()
        assert weight.shape == before[key].shape
        _assert_mean_rows(weight[ids], before[key], known)
        untouched = [i for i in range(before[key].shape[0]) if i not in ids]
        assert torch.equal(weight[untouched], before[key][untouched])


def test_tokens_the_tokenizer_already_has_keep_their_rows():
    tokenizer = build_tiny_tokenizer()
    first = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(tiny_llava_config(tokenizer)),
                                                  tasks=["region"], tokenizer=tokenizer)
    trained = first.get_input_embeddings().weight.detach().clone()
    trained[_task_token_ids(first.config)] += 1.0  # as after training
    mllm = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))  # the tokenizer now holds the task tokens
    with torch.no_grad():
        mllm.get_input_embeddings().weight.copy_(trained)
    second = TPOForConditionalGeneration.from_mllm(mllm, tasks=["region"], tokenizer=tokenizer)
    assert _task_token_ids(second.config) == _task_token_ids(first.config)
    assert torch.equal(second.get_input_embeddings().weight.detach(), trained)


def _tiny_llava(tasks=("region",)):
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(tiny_llava_config(tokenizer)),
                                                  tasks=list(tasks), tokenizer=tokenizer)
    for module in model.modules():  # dropout-free comparisons
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer


@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_labelled_logits_only_gives_the_same_lm_loss_and_gradients(num_items_in_batch):
    model, tokenizer = _tiny_llava()
    batch = make_batch(tokenizer, model.config, [SampleSpec(), SampleSpec(task=None, words=["what", "colour"])])
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    full = model(**batch, **extra)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.config.labelled_logits_only = True
    labelled = model(**batch, **extra)
    labelled.loss.backward()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    assert labelled.logits.shape == (int(keep.sum()), full.logits.shape[-1])
    # The same rows through the LM head, and cross-entropy over the same terms: equal up to the summation order of
    # float32 reductions (a few ulp).
    torch.testing.assert_close(labelled.logits, full.logits[:, :-1][keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(labelled.lm_loss, full.lm_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_generation_ignores_labelled_logits_only():
    model, tokenizer = _tiny_llava()
    model.config.labelled_logits_only = True
    batch = make_batch(tokenizer, model.config, [SampleSpec()])
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[:2] == batch["input_ids"].shape  # no labels: every position, as before


@pytest.mark.parametrize("reentrant", [False, True])
def test_frozen_vision_tower_builds_no_graph_under_gradient_checkpointing(reentrant):
    """transformers' `enable_input_require_grads` made the patch embedding's output require grad, so a frozen
    vision tower kept its activations and was recomputed and back-propagated at every step."""
    model, tokenizer = _tiny_llava()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    tower = model.mllm.model.vision_tower
    tower.requires_grad_(False)
    seen = {}
    handle = tower.register_forward_hook(
        lambda module, args, out: seen.update(requires_grad=out.last_hidden_state.requires_grad))
    batch = make_batch(tokenizer, model.config, [SampleSpec()])
    model(**batch).loss.backward()
    assert seen["requires_grad"] is False
    assert model.mllm.model.multi_modal_projector.linear_1.weight.grad is not None  # after the tower: still trains
    assert model.task_tokens.embeddings["region"].grad.abs().sum() > 0
    # A trained tower gets its gradients, also through reentrant checkpoints (which need the input to require grad).
    model.zero_grad()
    tower.requires_grad_(True)
    model(**batch).loss.backward()
    handle.remove()
    assert seen["requires_grad"] is True
    first_layer = tower.encoder.layers[0].self_attn.q_proj.weight
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Real widths: Qwen2.5-VL-7B and LLaVA-OneVision-7B shapes cut to one layer, bf16
# ------------------------------------------------------------------------------------------------
def _reference(model) -> dict:
    """Copies of what must survive a save and reload: everything outside the MLLM, the task tokens' embedding rows
    and the first LLM layer."""
    state = model.state_dict()
    ids = _task_token_ids(model.config)
    kept = {k: v.clone() for k, v in state.items() if not k.startswith("mllm.") or ".layers.0." in k}
    kept["task rows"] = model.get_input_embeddings().weight.detach()[ids].clone()
    kept["lm rows"] = model.get_output_embeddings().weight.detach()[ids].clone()
    return kept


@pytest.mark.slow
def test_qwen2_5_vl_7b_widths_in_bf16(scale, tmp_path):
    mllm, image_processor = scale.build_mllm("qwen2.5-vl-7b", tmp_path / "mllm", 1, 1, torch.bfloat16)
    tokenizer = scale.stand_in_tokenizer("qwen2.5-vl-7b")
    known = len(tokenizer)
    model = TPOForConditionalGeneration.from_mllm(mllm, tokenizer=tokenizer, sam2_config=scale.sam2_config())

    # 152,064 rows for 151,665 tokens: the task tokens take padding rows, at the vocabulary's mean, no resize
    ids = _task_token_ids(model.config)
    assert ids == list(range(151665, 151671))
    assert model.get_input_embeddings().weight.shape == (152064, 3584)
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):  # the mean of the vocabulary's
        _assert_mean_rows(embedding.weight.detach()[ids], embedding.weight.detach(), known)  # rows, left unchanged
    # every parameter in bf16, the heads and SAM2.1-hiera-tiny included
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.mask_head.image_size == 1024 and model.temporal_head.frame_proj[1].in_features == 2 * 3584

    # task-token hook: the slot positions' input embeddings are the learnable task tokens
    from tpo.processing.processing_tpo import TPOProcessor

    processor = TPOProcessor.from_model_config(model.config, image_processor, tokenizer, num_frames=4)
    batch = scale.scale_batch(processor, 56, "cpu", torch.bfloat16, kinds=("temporal", "region"))
    embedded = {}
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.update(out=out))
    model.mllm.requires_grad_(False)  # as in training (LoRA or frozen): no 152k-row gradients
    model.train()
    out = model(**batch)
    handle.remove()
    slot = model.config.task_token_ids["region"]["slots"][0]
    row, position = (batch["input_ids"] == slot).nonzero()[0].tolist()
    assert torch.equal(embedded["out"][row, position], model.task_tokens.embeddings["region"][0])
    assert out.pred_boxes.dtype == torch.bfloat16 and out.temporal_outputs["pred_spans"].dtype == torch.bfloat16
    assert {"lm", "assign", "region", "temporal"} <= set(out.loss_dict) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, weighted_loss(model, out))
    out.loss.backward()
    assert model.task_tokens.embeddings["region"].grad.abs().sum() > 0
    assert model.task_tokens.embeddings["temporal"].grad.abs().sum() > 0

    # save and reload: safetensors, bf16 kept, every head and the task rows bit-identical
    model.eval()
    with torch.no_grad():
        expected = model(**batch)
    reference = _reference(model)
    model.save_pretrained(tmp_path / "tpo")
    del model, mllm, out
    embedded.clear()
    gc.collect()
    reloaded = TPOForConditionalGeneration.from_pretrained(tmp_path / "tpo").eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    state = reloaded.state_dict()
    for key, value in _reference(reloaded).items():
        assert torch.equal(value, reference[key]), key
    assert set(reference) <= set(state) | {"task rows", "lm rows"}
    with torch.no_grad():
        again = reloaded(**batch)
    # Same weights and inputs in one process; bf16 matmuls may still pick another blocking for memory at another
    # alignment (see the remote-code tests): a bf16-ulp tolerance.
    torch.testing.assert_close(again.pred_boxes, expected.pred_boxes, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(again.loss, expected.loss, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_onevision_7b_vocabulary_resize_at_152k_rows(scale, tmp_path):
    """A tokenizer that fills the 152,128 rows: the task tokens grow both (untied) embeddings by 6 rows at the mean
    and every pretrained row stays as it was."""
    mllm, _ = scale.build_mllm("llava-onevision-7b", tmp_path / "mllm", 1, 1, torch.bfloat16)
    tokenizer = scale.stand_in_tokenizer("llava-onevision-7b")
    rows = mllm.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens([f"<filler_{i}>" for i in range(rows - len(tokenizer))])
    assert len(tokenizer) == rows == 152128
    embeddings = {"in": mllm.get_input_embeddings, "out": mllm.get_output_embeddings}
    samples = {key: get().weight.detach()[::997].clone() for key, get in embeddings.items()}  # 153 spread rows
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=["region"], tokenizer=tokenizer)
    assert _task_token_ids(model.config) == list(range(152128, 152134))
    assert model.config.get_text_config().vocab_size == 152134
    for key, get in embeddings.items():
        weight = get().weight.detach()
        assert weight.shape == (152134, 3584) and weight.dtype == torch.bfloat16
        assert torch.equal(weight[:rows:997], samples[key])  # pretrained rows kept
        _assert_mean_rows(weight[rows:], weight, rows)


def test_llava_processor_needs_no_video_token(scale):
    """LLaVA-1.5's tokenizer has `<image>` (32000) and no video token; a video is a sequence of images."""
    from tpo.processing.processing_tpo import TPOProcessor

    tokenizer = scale.stand_in_tokenizer("llava-1.5-7b")
    assert tokenizer.convert_tokens_to_ids("<video>") == tokenizer.unk_token_id
    config = tiny_llava_config(build_tiny_tokenizer())
    config.image_token_id, config.text_config.vocab_size = 32000, 32064
    model = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(config), tasks=["temporal", "region"],
                                                  tokenizer=tokenizer)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=3)
    batch = scale.scale_batch(processor, 32, "cpu", torch.float32, kinds=("temporal", "region"))
    per_image = config.image_seq_length
    assert (batch["input_ids"] == 32000).sum(-1).tolist() == [3 * per_image, per_image]
    assert batch["frame_token_index"][0].max() == 2 and (batch["frame_token_index"][0] >= 0).sum() == 3 * per_image
    assert batch["pixel_values"].shape[0] == 4  # three frames and one image
    out = model(**batch)
    assert torch.isfinite(out.loss) and {"lm", "assign", "region", "temporal"} <= set(out.loss_dict)
    torch.testing.assert_close(out.loss, weighted_loss(model, out))


# ------------------------------------------------------------------------------------------------
# The benchmark's measuring tools
# ------------------------------------------------------------------------------------------------
def test_step_profiler_attributes_ops_memory_and_kept_tensors(scale):
    """Hand-counted: Linear(8 -> 64) on 32 rows makes a 32 x 64 float32 output (8 KiB), ReLU (outside every
    component) a new one of the same size, which the last Linear keeps for its weight gradient; its own 32 x 4
    output stays alive because the caller holds it."""
    import time

    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    x = torch.randn(32, 8)
    profiler = scale.StepProfiler({"first": [model[0]], "last": [model[2]]}, clock=time.perf_counter)
    with profiler:
        out = model(x)
        kept = profiler.snapshot_retained()
        out.sum().backward()
    stats = profiler.stats
    first, glue, last = stats[("first", "forward")], stats[("losses & glue", "forward")], stats[("last", "forward")]
    assert first.largest_bytes == 32 * 64 * 4 and first.largest.startswith("addmm")
    assert (first.retained_bytes, glue.retained_bytes, last.retained_bytes) == (0, 32 * 64 * 4, 32 * 4 * 4)
    assert kept == 32 * 64 * 4 + 32 * 4 * 4
    # backward, inside the components: the first layer's weight gradient (its input needs none), the last layer's
    # input gradient (larger than its 4 x 64 weight gradient), ReLU's gradient outside them
    assert stats[("first", "backward")].largest == "mm.default (64, 8) torch.float32"
    assert stats[("last", "backward")].largest == "mm.default (32, 64) torch.float32"
    assert stats[("losses & glue", "backward")].largest_bytes == 32 * 64 * 4
    assert all(st.seconds >= 0 and st.ops > 0 for st in stats.values())
    assert profiler.live_bytes <= kept  # the graph is freed after backward: only `out` and the grads' owners remain


def test_batch_sizes_divide_what_is_left_by_the_bytes_per_sample(scale):
    model_bytes = {"weights": 10e9, "trained_state": 1e9, "per_sample": {"video": 2e9, "image": 0.5e9}}
    fits = scale.batch_sizes(model_bytes, capacities_gb=(24, 80), usable=0.9)
    # 24 GB: 0.9 x 24 - 11 = 10.6 GB left -> 5 videos, 21 images, 4 (video + image) pairs
    assert fits[24] == {"video": 5, "image": 21, "mixed x3": 4}
    assert fits[80] == {"video": 30, "image": 122, "mixed x3": 24}
