"""Forward+backward time of TPOForConditionalGeneration against the bare MLLM on the same batch, and the
mask head's cost per mask sample.

    python benchmarks/bench_model_overhead.py                       # micro, tiny and ~100M, region + temporal, mask
    python benchmarks/bench_model_overhead.py --sizes 100m --steps 10 --batch-size 4 --num-frames 4
    python benchmarks/bench_model_overhead.py --sizes tiny --measure overhead --device cuda --dtype bfloat16
    python benchmarks/bench_model_overhead.py --threads 1            # a shared CPU: steadier timings

Sizes: "micro" is the tests' LLaVA (~0.2 M parameters: SigLIP and Qwen2 64 wide x 2 layers), "tiny" the tiny
LLaVA of the project's stack notes (~4.6 M: SigLIP 128 x 4 layers, Qwen2 256 x 4 layers), "100m" a ~110 M
LLaVA (SigLIP 512 x 6, Qwen2 768 x 12). The small sizes take a small temporal head (`SMALL_TEMPORAL_HEAD`),
the 100m size the published one.

What is measured
----------------
Batches are built the way training builds them: samples of the common schema
(`tpo.processing.schema.empty_sample`) are encoded by `TPOProcessor` (chat template, task tokens,
visual placeholders, targets) and batched by `collate_encoded` with random decoded pixels; region
samples are images with a box, temporal samples are videos (`--num-frames` frames, each one LLaVA
image) with a span and per-clip saliency, so the temporal head trains on real targets
(`frame_token_index`, `frame_timestamps`, `video_durations`, `query_token_mask`, spans, saliency).

1. Overhead (one line per size, "overhead"): the bare MLLM (`LlavaForConditionalGeneration` with the
   same weights) gets the batch's `input_ids`, `attention_mask`, `pixel_values` and `labels`; TPO gets
   the whole batch (router, task tokens, heads, losses). Steps are interleaved (bare, TPO, bare, TPO, ...)
   after `--warmup` rounds so that machine noise hits both alike; `ratio` is median(TPO) / median(bare)
   of forward+backward wall time. Target: at most 1.05 with the region and temporal heads (they read
   hidden states the MLLM computes anyway). `extra` is median(TPO) - median(bare) in ms: TPO's cost per
   step. In the micro size the whole MLLM step is ~7 ms of mostly per-op dispatch, so the ratio measures
   that fixed cost (a few hundred small ops for router, task tokens, region head and losses; a DETR
   temporal head is itself a 4-layer transformer, as deep as the micro MLLM) rather than the heads' share
   of a real model's step.
2. Mask head (one line per size, "mask"): a model with the mask task (tiny SAM2 of
   `tpo.tiny.tiny_sam2_config(--sam2-image-size)`, SAM2's image encoder frozen as in training
   unless `--train-sam2-encoder`) times batch A of N region images and batch B, the same images with M
   of them asked as mask samples (same prompt template, so A and B have identical token lengths).
   Rounds are interleaved (bare(A), TPO(A), TPO(B), mask head alone). `mask head ... ms/mask sample` is
   the mask head alone (SAM2 image encoder + prompt MLP + mask decoder + BCE/Dice, forward and
   backward, on B's M SAM2 images) / M; `x bare sample` divides it by one bare-MLLM sample's share of
   batch A (median bare(A) / N). `end to end` is the median over rounds of TPO(B) - TPO(A), / M: the
   same cost seen in whole steps, meaningful only where it exceeds the step-to-step noise (the small
   sizes; on the ~100M MLLM a tiny SAM2 is far below it).

Timings are wall clock on whatever device `--device` names (default: the current accelerator, else
CPU); the device is synchronised around each step.
"""

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tpo import TPOForConditionalGeneration
from tpo.processing.collator_tpo import collate_encoded
from tpo.processing.processing_tpo import TPOProcessor, encode_rle
from tpo.processing.schema import empty_sample
from tpo.tiny import build_tiny_tokenizer, random_media, tiny_llava_config, tiny_sam2_config

SIZES = ("micro", "tiny", "100m")
# The temporal head per size. The published head (d_model 256, 2 + 2 layers, ~4 M parameters) is sized for a
# 7 B LLM; on the small sizes it would be as large as the whole MLLM, so they take the tests' small head.
SMALL_TEMPORAL_HEAD = {"d_model": 64, "num_heads": 4, "dim_feedforward": 128}
TEMPORAL_HEAD_CONFIGS = {"micro": SMALL_TEMPORAL_HEAD, "tiny": SMALL_TEMPORAL_HEAD, "100m": {}}
MLLM_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels")
# One template per task, shared by region and mask, so that swapping a region sample for a mask sample
# changes no token count (the mask benchmark compares two batches of identical lengths).
PROMPT_TEMPLATES = {
    "region": ["Where is the {query} in the image?"],
    "mask": ["Where is the {query} in the image?"],
    "temporal": ["When is the {query} visible in the video?"],
}


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def _scaled_llava_config(tokenizer, image_size: int, vision: dict, text: dict) -> LlavaConfig:
    """`tiny_llava_config`'s layout (8 px patches, pad/bos/end-of-turn ids from `tokenizer`) with SigLIP and Qwen2
    of the given sizes: `vision` and `text` are their hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads (and for the text num_key_value_heads, vocab_size)."""
    config = tiny_llava_config(tokenizer, image_size=image_size, patch_size=8)
    config.vision_config = SiglipVisionConfig(image_size=image_size, patch_size=8, **vision)
    ids = {key: getattr(config.text_config, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config.text_config = Qwen2Config(tie_word_embeddings=True, **ids, **text)
    return config


def llava_tiny_config(tokenizer) -> LlavaConfig:
    """About 4.6 M parameters: the tiny LLaVA of the project's stack notes (SigLIP 128-wide x 4 layers at 32 px,
    16 tokens per image; Qwen2 256-wide x 4 layers, 2,000-token vocabulary)."""
    return _scaled_llava_config(
        tokenizer, 32, vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        text=dict(vocab_size=2000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    )


def llava_100m_config(tokenizer) -> LlavaConfig:
    """About 110 M parameters: SigLIP 512-wide x 6 layers at 64 px (64 tokens per image), Qwen2 768-wide
    x 12 layers, 32k vocabulary."""
    return _scaled_llava_config(
        tokenizer, 64, vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
        text=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4),
    )


def mllm_config(size: str, tokenizer) -> LlavaConfig:
    """The LLaVA configuration of `size` ("micro": the tests' ~0.2 M parameters at 32 px, "tiny": ~4.6 M,
    "100m"), without SigLIP's pooling head (LLaVA reads hidden states; the head would only cost time)."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; use one of {SIZES}.")
    builders = {"micro": tiny_llava_config, "tiny": llava_tiny_config, "100m": llava_100m_config}
    config = builders[size](tokenizer)
    config.vision_config.vision_use_head = False
    return config


def build_models(size: str, tasks: list[str], num_frames: int = 4, sam2_image_size: int = 128,
                 train_sam2_encoder: bool = False, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0):
    """(tpo_model, bare_mllm, processor) for `size`, both models in train mode with the very same MLLM weights.

    The bare model is a separate `LlavaForConditionalGeneration` (without TPO's task-token hook on its
    embeddings) whose parameters and buffers ARE the TPO model's MLLM tensors (`share_tensors`), task-token
    rows included: both compute the same MLLM from the same memory. Two copies of the weights would make each
    model evict the other's from the CPU caches at every switch, a cost that measured ~1-2 ms per step on the
    tiny size and does not fall evenly on both sides. With "mask" in `tasks` the model carries a tiny SAM2 at
    `sam2_image_size` px.
    """
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    sam2_config = tiny_sam2_config(sam2_image_size) if "mask" in tasks else None
    extra = {"mask_head_config": {"freeze_image_encoder": not train_sam2_encoder}} if sam2_config else {}
    if "temporal" in tasks:
        extra["temporal_head_config"] = dict(TEMPORAL_HEAD_CONFIGS[size])
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(mllm_config(size, tokenizer)), tasks=list(tasks), tokenizer=tokenizer,
        sam2_config=sam2_config, **extra,
    )
    model.to(device=device, dtype=dtype)
    bare = share_tensors(LlavaForConditionalGeneration(model.config.mllm_config), model.mllm)
    image_size = model.config.mllm_config.vision_config.image_size
    processor = TPOProcessor.from_model_config(
        model.config, SiglipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer,
        num_frames=num_frames, prompt_templates=PROMPT_TEMPLATES,
    )
    model.to(device=device, dtype=dtype).train()
    bare.to(device=device, dtype=dtype).train()
    return model, bare, processor


def share_tensors(target: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """Make every parameter and buffer of `target` the same tensor object as `source`'s of the same name (tied
    aliases included); the two modules must have the same structure. Returns `target`."""
    tensors = {**dict(source.named_parameters(remove_duplicate=False)), **dict(source.named_buffers(remove_duplicate=False))}
    own = [name for name, _ in target.named_parameters(remove_duplicate=False)]
    own += [name for name, _ in target.named_buffers(remove_duplicate=False)]
    missing = sorted(set(own) ^ set(tensors))
    if missing:
        raise ValueError(f"The modules differ in their tensors: {missing[:5]}")
    for name in own:
        module_name, _, attribute = name.rpartition(".")
        module = target.get_submodule(module_name)
        if isinstance(tensors[name], torch.nn.Parameter):
            setattr(module, attribute, tensors[name])
        else:
            module._buffers[attribute] = tensors[name]
    return target


# --------------------------------------------------------------------------------------------------
# Samples and batches
# --------------------------------------------------------------------------------------------------
def make_sample(kind: str, index: int, image_size: int) -> dict:
    """One sample of the common schema: "region" (an image with one box), "mask" (the same image with a
    rectangular mask in its place), "temporal" (an 8 s video with one span and per-clip saliency).

    Images are `image_size` x `image_size` pixels (the vision tower's size: the resize costs nothing
    in the collator); box / mask / span positions vary with `index`."""
    side = image_size
    shift = (index % 4) / 16.0
    x0, y0, x1, y1 = (0.1 + shift) * side, 0.2 * side, (0.5 + shift) * side, 0.7 * side
    common = dict(id=f"{kind}{index}", source="bench", split="train", task=kind, query="red circle",
                  image_size=[side, side])
    if kind == "region":
        return empty_sample(**common, media_type="image", media_path=f"img{index}.png",
                            boxes_xyxy_pixels=[[x0, y0, x1, y1]])
    if kind == "mask":
        mask = np.zeros((side, side), dtype=bool)
        mask[int(y0):int(y1), int(x0):int(x1)] = True
        return empty_sample(**common, media_type="image", media_path=f"img{index}.png", masks_rle=[encode_rle(mask)])
    if kind == "temporal":
        start = 1.0 + (index % 3)
        return empty_sample(**{**common, "query": "blue square"}, media_type="video", media_path=f"vid{index}.mp4",
                            duration_seconds=8.0, spans_seconds=[[start, start + 4.0]], saliency_clip_seconds=2.0,
                            saliency_clip_ids=[int(start // 2), int(start // 2) + 1],
                            saliency_scores=[[4, 3, 4], [2, 2, 3]])
    raise ValueError(f"Unknown sample kind {kind!r}; use 'region', 'mask' or 'temporal'.")


def fake_media(plan: dict, targets: dict | None = None) -> dict:
    """Random pixels in place of decoding (`tpo.tiny.random_media`)."""
    return random_media(plan)


def build_batch(processor: TPOProcessor, samples: list[dict], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, mode: str = "train") -> dict:
    """Encode `samples` with the processor, decode fake media and collate (right padding in training,
    left for generation): the model's keyword arguments, on `device`, floating tensors in `dtype`
    (`tpo_meta` removed). Shapes: input_ids/attention_mask/labels (batch, seq); pixel_values
    (images + frames, 3, H, W); targets as `collate_encoded` documents."""
    encoded = [processor.encode(sample, mode=mode) for sample in samples]
    media = [fake_media(e.media, e.targets) for e in encoded]
    batch = collate_encoded(processor, encoded, media, padding_side="right" if mode == "train" else "left")
    batch.pop("tpo_meta", None)
    return {key: _to(value, device, dtype) for key, value in batch.items()}


def _to(value, device, dtype):
    if not torch.is_tensor(value):
        return value
    if value.is_floating_point() and value.dtype != dtype and value.dim() >= 4:  # pixel tensors follow the model
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def bare_inputs(batch: dict) -> dict:
    """What the bare MLLM receives: `input_ids`, `attention_mask`, `pixel_values`, `labels`."""
    return {key: batch[key] for key in MLLM_KEYS if key in batch}


def round_robin(kinds: list[str], batch_size: int) -> list[str]:
    """`batch_size` sample kinds cycling through `kinds`."""
    return [kinds[i % len(kinds)] for i in range(batch_size)]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type != "cpu" and hasattr(torch, "accelerator") and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


def forward_backward_seconds(model: torch.nn.Module, inputs: dict) -> float:
    """Wall time of one forward pass + backward of its `.loss` (gradients cleared first, untimed)."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(runs: dict[str, Callable[[], float]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Call every run once per round, in order, for `warmup` + `steps` rounds; the seconds of each run
    in the timed rounds (index r of every list is round r)."""
    times = {name: [] for name in runs}
    for step in range(warmup + steps):
        for name, run in runs.items():
            seconds = run()
            if step >= warmup:
                times[name].append(seconds)
    return times


def interleaved_medians(runs: dict[str, Callable[[], float]], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per run of `interleaved_times`."""
    return {name: statistics.median(values) for name, values in interleaved_times(runs, steps, warmup).items()}


def mask_head_seconds(model: TPOForConditionalGeneration, batch: dict) -> float:
    """Wall time of the mask head alone on a batch's SAM2 images: forward (SAM2 image encoder, prompt MLP,
    mask decoder), BCE + Dice loss and backward, from task embeddings (queries, k, hidden) that stand in
    for the slot tokens' hidden states (the MLLM's share of that gradient is part of the MLLM's backward)."""
    head = model.mask_head
    device = batch["sam2_pixel_values"].device
    num_queries = int(batch["mask_query_index"].max()) + 1
    dtype = next(head.parameters()).dtype
    embeddings = torch.randn(num_queries, model.config.num_task_tokens, model.config.get_text_config().hidden_size,
                             device=device, dtype=dtype, requires_grad=True)
    head.zero_grad(set_to_none=True)
    synchronize(device)
    start = time.perf_counter()
    outputs = head(embeddings, sam2_pixel_values=batch["sam2_pixel_values"], query_index=batch["mask_query_index"])
    head.loss(outputs, batch["mask_targets"])["mask"].backward()
    synchronize(device)
    return time.perf_counter() - start


def _parameters(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
def measure_overhead(size: str = "micro", tasks: tuple[str, ...] = ("region", "temporal"), steps: int = 10,
                     warmup: int = 2, batch_size: int = 4, num_frames: int = 4, device: str | None = None,
                     dtype: torch.dtype = torch.float32, verbose: bool = True) -> dict:
    """Forward+backward of TPO against the bare MLLM on a batch mixing `tasks` (round robin).

    Returns {"ratio", "bare_ms", "tpo_ms", "params_m", "tpo_params_m", "tokens", "losses"}; prints one line
    when `verbose`.
    """
    device = resolve_device(device)
    model, bare, processor = build_models(size, list(tasks), num_frames=num_frames, device=device, dtype=dtype)
    image_size = model.config.mllm_config.vision_config.image_size
    kinds = round_robin(list(tasks), batch_size)
    batch = build_batch(processor, [make_sample(kind, i, image_size) for i, kind in enumerate(kinds)], device, dtype)
    plain = bare_inputs(batch)
    with torch.no_grad():
        losses = {k: float(v) for k, v in model(**batch).loss_dict.items()}
    missing = [task for task in tasks if task not in losses]
    if missing:
        raise RuntimeError(f"The TPO batch computed no loss for {missing}: the benchmark would not time those heads.")
    medians = interleaved_medians({"bare": lambda: forward_backward_seconds(bare, plain),
                                   "tpo": lambda: forward_backward_seconds(model, batch)}, steps, warmup)
    result = {"ratio": medians["tpo"] / medians["bare"], "bare_ms": medians["bare"] * 1e3,
              "tpo_ms": medians["tpo"] * 1e3, "params_m": _parameters(model),
              "tpo_params_m": _parameters(model) - _parameters(model.mllm), "tokens": tuple(batch["input_ids"].shape),
              "losses": losses}
    if verbose:
        rows, seq = result["tokens"]
        print(f"overhead {size:>5} ({result['params_m']:6.1f} M params, {result['tpo_params_m']:.1f} M of them TPO's, "
              f"batch {rows} x {seq} tokens, "
              f"{' + '.join(f'{kinds.count(t)} {t}' for t in tasks)}, {num_frames} frames/video, {steps} steps): "
              f"bare {result['bare_ms']:8.1f} ms  TPO {result['tpo_ms']:8.1f} ms  extra "
              f"{result['tpo_ms'] - result['bare_ms']:6.2f} ms  ratio {result['ratio']:.3f}"
              f"  (target <= 1.05)", flush=True)
    return result


def measure_mask_cost(size: str = "micro", steps: int = 10, warmup: int = 2, batch_size: int = 4,
                      num_mask: int = 2, sam2_image_size: int = 128, train_sam2_encoder: bool = False,
                      device: str | None = None, dtype: torch.dtype = torch.float32, verbose: bool = True) -> dict:
    """Cost of the mask head per mask sample: batch A = `batch_size` region images, batch B = the same
    images with the first `num_mask` asked as mask samples (identical token lengths).

    Two estimates: `ms_per_mask_sample` times the mask head alone on batch B's SAM2 images
    (`mask_head_seconds`), divided by `num_mask`; `ms_per_mask_sample_end_to_end` is the median over
    rounds of TPO(B) - TPO(A), divided by `num_mask` (it includes everything B adds, but it is the
    difference of two whole steps: below the step-to-step noise on a large MLLM or a busy machine).
    Returns those, `relative_to_bare_sample` (head-alone ms per mask sample / (median bare(A) / batch_size)),
    "bare_ms", "tpo_region_ms", "tpo_mixed_ms", "head_ms", "ratio_region", "ratio_mixed" (against bare(A)),
    "params_m", "sam2_params_m".
    """
    if not 0 < num_mask <= batch_size:
        raise ValueError(f"num_mask must be in [1, batch_size={batch_size}], got {num_mask}.")
    device = resolve_device(device)
    model, bare, processor = build_models(size, ["region", "temporal", "mask"], sam2_image_size=sam2_image_size,
                                          train_sam2_encoder=train_sam2_encoder, device=device, dtype=dtype)
    image_size = model.config.mllm_config.vision_config.image_size
    region = [make_sample("region", i, image_size) for i in range(batch_size)]
    mixed = [make_sample("mask", i, image_size) for i in range(num_mask)] + region[num_mask:]
    batch_a = build_batch(processor, region, device, dtype)
    batch_b = build_batch(processor, mixed, device, dtype)
    if batch_a["input_ids"].shape != batch_b["input_ids"].shape:
        raise RuntimeError("Region and mask batches differ in length; the mask cost would include LLM tokens.")
    plain = bare_inputs(batch_a)
    times = interleaved_times({"bare": lambda: forward_backward_seconds(bare, plain),
                               "region": lambda: forward_backward_seconds(model, batch_a),
                               "mixed": lambda: forward_backward_seconds(model, batch_b),
                               "head": lambda: mask_head_seconds(model, batch_b)}, steps, warmup)
    medians = {name: statistics.median(values) for name, values in times.items()}
    paired = statistics.median(b - a for a, b in zip(times["region"], times["mixed"]))
    per_mask = medians["head"] / num_mask
    bare_sample = medians["bare"] / batch_size
    result = {"ms_per_mask_sample": per_mask * 1e3, "ms_per_mask_sample_end_to_end": paired / num_mask * 1e3,
              "relative_to_bare_sample": per_mask / bare_sample, "bare_ms": medians["bare"] * 1e3,
              "tpo_region_ms": medians["region"] * 1e3, "tpo_mixed_ms": medians["mixed"] * 1e3,
              "head_ms": medians["head"] * 1e3, "ratio_region": medians["region"] / medians["bare"],
              "ratio_mixed": medians["mixed"] / medians["bare"], "params_m": _parameters(model),
              "sam2_params_m": _parameters(model.mask_head.sam2)}
    if verbose:
        frozen = "trained" if train_sam2_encoder else "frozen"
        print(f"mask     {size:>5} ({result['params_m']:6.1f} M params incl. SAM2 {result['sam2_params_m']:.1f} M at "
              f"{sam2_image_size} px, image encoder {frozen}; batch {batch_size}, {num_mask} mask, {steps} steps): "
              f"bare {result['bare_ms']:8.1f} ms  TPO region-only {result['tpo_region_ms']:8.1f} ms "
              f"(ratio {result['ratio_region']:.3f})  with masks {result['tpo_mixed_ms']:8.1f} ms "
              f"(ratio {result['ratio_mixed']:.3f})  ->  mask head {result['ms_per_mask_sample']:.1f} ms/mask sample = "
              f"{result['relative_to_bare_sample']:.3f} x bare sample ({bare_sample * 1e3:.1f} ms); "
              f"end to end {result['ms_per_mask_sample_end_to_end']:.1f} ms/mask sample", flush=True)
    return result


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or the current accelerator when there is one, else CPU."""
    if device is not None:
        return torch.device(device)
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--tasks", nargs="+", default=["region", "temporal"], choices=["region", "temporal"],
                        help="sample kinds of the overhead batch (round robin)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=4, help="frames per temporal video (LLaVA images)")
    parser.add_argument("--num-mask", type=int, default=2, help="mask samples in the mask batch")
    parser.add_argument("--sam2-image-size", type=int, default=128)
    parser.add_argument("--train-sam2-encoder", action="store_true", help="backpropagate into SAM2's image encoder")
    parser.add_argument("--measure", nargs="+", default=["overhead", "mask"], choices=["overhead", "mask"])
    parser.add_argument("--device", default=None, help="default: the current accelerator, else cpu")
    parser.add_argument("--dtype", default="float32", help="torch dtype name of the models")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    for size in args.sizes:
        if "overhead" in args.measure:
            result = measure_overhead(size, tuple(args.tasks), args.steps, args.warmup, args.batch_size,
                                      args.num_frames, args.device, dtype)
            assert math.isfinite(result["ratio"])
        if "mask" in args.measure:
            measure_mask_cost(size, args.steps, args.warmup, args.batch_size, args.num_mask, args.sam2_image_size,
                              args.train_sam2_encoder, args.device, dtype)


if __name__ == "__main__":
    main()
