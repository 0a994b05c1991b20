"""Tracking throughput and peak memory against sequence length, as figures of one run.

`examples/evaluate_tpo.py predict` tracks one LaSOT-layout sequence (JPEG frames of a moving rectangle) with a
tiny TPO checkpoint (the tiny LLaVA and a tiny SAM2 at 128 px, the mask head with its box prompt), once with
1,000 frames and once with 2,000, each in a fresh process: frames per second of tracking (the `_time.txt` the
run writes, frame 0's MLLM pass included) and of the whole command, and the process's peak resident memory.
Frames are streamed (`MaskHead.track_stream`), so the peak must not grow with the length. `--offline` adds the
contrast: the same frames decoded into one tensor and tracked by `MaskHead.track` (all frames in memory).

    python benchmarks/bench_tracking.py [--lengths 1000 2000] [--threads 1] [--offline] [--model <TPO checkpoint>]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FRAME_HEIGHT, FRAME_WIDTH = 240, 320
SAM2_IMAGE_SIZE = 128


def build_checkpoint(folder: Path) -> str:
    """A tiny TPO checkpoint (model + processor) with a mask head, saved to `folder`."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tpo import TPOForConditionalGeneration
    from tpo.processing.processing_tpo import TPOProcessor
    from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_sam2_config

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(tiny_llava_config(tokenizer)), tasks=["region", "mask"], tokenizer=tokenizer,
        sam2_config=tiny_sam2_config(SAM2_IMAGE_SIZE), mask_head_config={"box_prompt": True})
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=8)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def write_sequence(root: Path, name: str, count: int) -> Path:
    """A LaSOT sequence `<root>/<class>/<name>/` of `count` JPEG frames of a rectangle moving right and back."""
    from PIL import Image

    folder = root / name.rsplit("-", 1)[0] / name
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        x = 20 + int(100 * abs(np.sin(index / 50)))
        image = np.full((FRAME_HEIGHT, FRAME_WIDTH, 3), 40, np.uint8)
        image[80:140, x: x + 60] = (230, 60, 40)
        Image.fromarray(image).save(folder / "img" / f"{index + 1:08d}.jpg", quality=90)
        lines.append(f"{x},80,60,60")
    (folder / "groundtruth.txt").write_text("\n".join(lines) + "\n")
    (folder / "nlp.txt").write_text("red square moving left and right\n")
    return folder


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_predict(model: str, root: str, output_dir: str, threads: int = 1) -> dict:
    """One `predict` run over the LaSOT folder `root` (in this process): frames, seconds, frames per second."""
    import torch

    from tpo.training.predict import predict_dataset

    torch.set_num_threads(threads)
    data = Path(output_dir) / "data.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps([{"format": "lasot", "root": root}]))
    start = time.perf_counter()
    summary = predict_dataset(model, str(data), output_dir, device="cpu")  # what `evaluate_tpo.py predict` runs
    wall = time.perf_counter() - start
    folder = Path(summary["files"][0]["path"])
    seconds = np.concatenate([np.atleast_1d(np.loadtxt(f)) for f in sorted(folder.glob("*_time.txt"))])
    return {"frames": int(len(seconds)), "tracking_seconds": float(seconds.sum()), "wall_seconds": wall,
            "tracking_fps": float(len(seconds) / seconds.sum()), "wall_fps": float(len(seconds) / wall),
            "peak_rss_mib": peak_rss_mib()}


def measure_offline(model: str, root: str, threads: int = 1) -> dict:
    """The contrast: every frame decoded into one tensor, then `MaskHead.track` (SAM2 holds all of them)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    from tpo.processing.tracking_readers import read_lasot
    from tpo.training.tracking import read_frame, sam2_box_from_xywh

    torch.set_num_threads(threads)
    tpo = AutoModel.from_pretrained(model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
    (sequence,) = read_lasot(root)
    start = time.perf_counter()
    frames = processor.sam2_inputs([read_frame(p) for p in sequence.frame_paths])["sam2_pixel_values"]
    box = sam2_box_from_xywh(sequence.first_box_xywh, sequence.image_size, tpo.mask_head.image_size)
    with torch.no_grad():
        tpo.mask_head.track(None, frames, initial_box=box)
    seconds = time.perf_counter() - start
    return {"frames": len(sequence.frame_paths), "wall_seconds": seconds, "wall_fps": len(sequence.frame_paths) / seconds,
            "peak_rss_mib": peak_rss_mib()}


def _child(args) -> None:
    if args.child == "offline":
        result = measure_offline(args.model, args.root, args.threads)
    else:
        result = measure_predict(args.model, args.root, args.output_dir, args.threads)
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(mode: str, model: str, root: Path, output_dir: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--model", model, "--root", str(root),
               "--output-dir", str(output_dir), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000], help="frames per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    parser.add_argument("--model", help="a TPO checkpoint with a mask head (default: a tiny one built here)")
    parser.add_argument("--offline", action="store_true", help="also track with every frame in memory (contrast)")
    parser.add_argument("--child", choices=("predict", "offline"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or build_checkpoint(tmp / "checkpoint")
        rows = []
        for length in args.lengths:
            root = tmp / f"lasot_{length}"
            write_sequence(root, "square-1", length)
            rows.append(("predict (streamed)", length, _run_child("predict", model, root, tmp / f"out_{length}",
                                                                  args.threads)))
            if args.offline:
                rows.append(("all frames in memory", length, _run_child("offline", model, root, tmp, args.threads)))
    print(f"{'mode':<22} {'frames':>7} {'tracking fps':>13} {'command fps':>12} {'peak RSS MiB':>13}")
    for mode, length, result in rows:
        tracking = f"{result['tracking_fps']:.1f}" if "tracking_fps" in result else "-"
        print(f"{mode:<22} {length:>7} {tracking:>13} {result['wall_fps']:>12.1f} {result['peak_rss_mib']:>13.0f}")
    for mode in dict.fromkeys(m for m, _, _ in rows):
        peaks = [(length, r["peak_rss_mib"]) for m, length, r in rows if m == mode]
        if len(peaks) >= 2:
            (short, low), (long, high) = peaks[0], peaks[-1]
            print(f"{mode}: peak RSS at {long} frames / at {short} frames = {high / low:.3f} "
                  f"({high - low:+.0f} MiB)")


if __name__ == "__main__":
    main()
