"""Cost of dense temporal features: a training step's time and memory per temporal sample, and the decoding time
per sample, at 16 LLM frames against 16 LLM frames + 75 dense clips (a 150 s video in 2-second clips, the
QVHighlights setting).

    python benchmarks/bench_dense_temporal.py                          # sizes tiny and 100m, CPU
    python benchmarks/bench_dense_temporal.py --sizes 100m --device cuda --dtype bfloat16 --batch-size 4
    python benchmarks/bench_dense_temporal.py --threads 1 --skip-decoding

What is measured
----------------
1. Step (one line per size): a TPO LLaVA of `bench_model_overhead`'s sizes with the temporal task, a batch of
   `--batch-size` temporal samples (150 s videos, one span, per-clip saliency) built as training builds them
   (processor, collator; random pixels instead of decoding), forward + backward of the whole model in train
   mode. "frames": the temporal head reads the LLM's 16 frames; "frames + clips": it also reads 75 clips whose
   features the MLLM's vision tower computes without gradient (`dense_clip_seconds` 2). Memory: the bytes of
   the tensors a step keeps for its backward pass (activations, parameters excluded; counted once per storage
   through `torch.autograd.graph.saved_tensors_hooks`), which is what a training step's memory grows with and
   the same on every device; on CUDA also the peak allocated memory of a step above what the model holds before
   it. All per sample (divided by the batch size); time is the median step / batch size.
2. Decoding (one line): `tpo.processing.pipeline.load_media` of the first 150 s of `bench_video_loading`'s
   854x480 H.264 video with a keyframe every 2 s (generated once, cached), 16 frames against 16 frames + 75 clips
   decoded in the same pass (PyAV seek sampling); the median over `--repeats` interleaved runs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

sys.path.insert(0, str(Path(__file__).parent))
from bench_model_overhead import TEMPORAL_HEAD_CONFIGS, mllm_config, resolve_device, synchronize  # noqa: E402
from bench_video_loading import make_video  # noqa: E402

from tpo import TPOForConditionalGeneration  # noqa: E402
from tpo.processing.collator_tpo import collate_encoded  # noqa: E402
from tpo.processing.pipeline import load_media  # noqa: E402
from tpo.processing.processing_tpo import TPOProcessor  # noqa: E402
from tpo.processing.schema import empty_sample  # noqa: E402
from tpo.tiny import build_tiny_tokenizer, random_media  # noqa: E402

DURATION_SECONDS, LLM_FRAMES, CLIP_SECONDS = 150.0, 16, 2.0  # 75 clips
MODES = {"frames": 0.0, "frames + clips": CLIP_SECONDS}


def temporal_sample(index: int, image_size: int) -> dict:
    start = 20.0 + 10 * index
    return empty_sample(id=f"t{index}", source="bench", split="train", task="temporal", query="blue square",
                        image_size=[image_size, image_size], media_type="video", media_path=f"vid{index}.mp4",
                        duration_seconds=DURATION_SECONDS, spans_seconds=[[start, start + 12.0]],
                        saliency_clip_seconds=2.0, saliency_clip_ids=list(range(int(start // 2), int(start // 2) + 6)),
                        saliency_scores=[[3, 2, 4]] * 6)


def build(size: str, clip_seconds: float, batch_size: int, device, dtype, seed: int = 0):
    """(model, batch) of `size`, train mode, temporal task, `clip_seconds` dense clips (0: off)."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    head = {**TEMPORAL_HEAD_CONFIGS[size], "dense_clip_seconds": clip_seconds}
    model = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(mllm_config(size, tokenizer)),
                                                  tasks=["temporal"], tokenizer=tokenizer, temporal_head_config=head)
    image_size = model.config.mllm_config.vision_config.image_size
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}), tokenizer, num_frames=LLM_FRAMES)
    encoded = [processor.encode(temporal_sample(i, image_size)) for i in range(batch_size)]
    batch = collate_encoded(processor, encoded, [random_media(e.media) for e in encoded])
    batch.pop("tpo_meta")
    batch = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and v.dim() >= 4 else v.to(device))
             for k, v in batch.items()}
    return model.to(device=device, dtype=dtype).train(), batch


def saved_for_backward_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct non-parameter storages one forward pass saves for its backward pass."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    return sum(storages.values())


def measure_step(size: str, clip_seconds: float, batch_size: int = 2, steps: int = 5, warmup: int = 1,
                 device: str | None = None, dtype: str = "float32") -> dict:
    """Median forward+backward seconds per sample, bytes saved for backward per sample and (CUDA) the peak
    allocated bytes per sample of a step (see the module docstring), for one configuration."""
    device = resolve_device(device)
    model, batch = build(size, clip_seconds, batch_size, device, getattr(torch, dtype))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    result = {"saved_bytes_per_sample": saved_for_backward_bytes(model, batch) / batch_size,
              "clips": int((batch["dense_clip_timestamps"] >= 0).sum(-1).max()) if clip_seconds else 0}
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        result["peak_bytes_per_sample"] = (torch.cuda.max_memory_allocated(device) - before) / batch_size
    result["seconds_per_sample"] = statistics.median(step() for _ in range(steps)) / batch_size
    return result


def measure_decoding(video: Path, repeats: int = 3) -> dict:
    """Median seconds of `load_media` for 16 frames and for 16 frames + 75 clips of the first 150 s of `video`,
    interleaved."""
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(mllm_config("micro", tokenizer)),
                                                  tasks=["temporal"], tokenizer=tokenizer,
                                                  temporal_head_config={"dense_clip_seconds": CLIP_SECONDS})
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=LLM_FRAMES)
    sample = {**temporal_sample(0, 32), "media_path": str(video), "image_size": [480, 854]}
    dense_plan = processor.encode(sample).media
    plain_plan = {k: v for k, v in dense_plan.items() if not k.startswith("dense_")}
    times = {"frames": [], "frames + clips": []}
    for _ in range(repeats):
        for name, plan in (("frames", plain_plan), ("frames + clips", dense_plan)):
            start = time.perf_counter()
            load_media(plan)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=list(TEMPORAL_HEAD_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="decoding runs per configuration")
    parser.add_argument("--cache-dir", default=".cache/bench")
    parser.add_argument("--skip-decoding", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{LLM_FRAMES} LLM frames vs {LLM_FRAMES} frames + {int(DURATION_SECONDS / CLIP_SECONDS)} clips of "
          f"{CLIP_SECONDS:g} s ({DURATION_SECONDS:g} s videos), batch {args.batch_size}, per sample:")
    for size in args.sizes:
        results = {name: measure_step(size, seconds, args.batch_size, args.steps, args.warmup, args.device, args.dtype)
                   for name, seconds in MODES.items()}
        plain, dense = results["frames"], results["frames + clips"]

        def describe(result: dict) -> str:
            peak = f", peak {result['peak_bytes_per_sample'] / 2**20:.1f} MiB" if "peak_bytes_per_sample" in result else ""
            return (f"{result['seconds_per_sample'] * 1e3:.1f} ms, saved for backward "
                    f"{result['saved_bytes_per_sample'] / 2**20:.2f} MiB{peak}")

        print(f"  {size:5s} step: frames {describe(plain)}; frames + {dense['clips']} clips {describe(dense)}; time "
              f"x{dense['seconds_per_sample'] / plain['seconds_per_sample']:.2f}, saved memory "
              f"x{dense['saved_bytes_per_sample'] / plain['saved_bytes_per_sample']:.3f}")
    if not args.skip_decoding:
        video = make_video(Path(args.cache_dir) / "web_5min_480p.mp4")  # its first 150 s
        decoding = measure_decoding(video, args.repeats)
        print(f"  decoding (854x480 H.264, keyframe every 2 s): frames {decoding['frames'] * 1e3:.0f} ms, frames + "
              f"clips {decoding['frames + clips'] * 1e3:.0f} ms (x{decoding['frames + clips'] / decoding['frames']:.2f})")


if __name__ == "__main__":
    main()
