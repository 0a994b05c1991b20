"""Seek-based sampling (tpo.processing.video) against transformers' PyAV loader, which decodes every
frame up to the last one sampled.

A 5-minute 854x480 H.264 video with a keyframe every 2 seconds (web-like) is generated once (cached),
16 frames are sampled uniformly by both loaders at the same frame indices, the pixels are compared,
and the times (best of a few runs each, interleaved) and their ratio are printed. Target: >= 10x.

    python benchmarks/bench_video_loading.py [--cache-dir .cache/bench] [--frames 16] [--repeats 3]
"""

import argparse
import os
import time
from pathlib import Path

import av
import numpy as np
from transformers.video_utils import load_video as transformers_load_video

from tpo.processing.video import load_video

FPS, SECONDS, WIDTH, HEIGHT, KEYFRAME_SECONDS = 30, 300, 854, 480, 2


def make_video(path: Path) -> Path:
    """Moving gradients and a frame counter bar, encoded like web video (keyframe every 2 s)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    container = av.open(str(partial), "w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    stream.options = {"g": str(FPS * KEYFRAME_SECONDS), "keyint_min": str(FPS * KEYFRAME_SECONDS),
                      "sc_threshold": "0", "preset": "ultrafast", "crf": "28"}
    xs = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :]
    ys = np.linspace(0, 255, HEIGHT, dtype=np.float32)[:, None]
    for index in range(FPS * SECONDS):
        image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        image[..., 0] = (xs + index * 3) % 256
        image[..., 1] = (ys + index * 2) % 256
        image[..., 2] = (xs + ys + index) % 256
        image[:20, : int(WIDTH * index / (FPS * SECONDS))] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    os.replace(partial, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=".cache/bench")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    video = make_video(Path(args.cache_dir) / "web_5min_480p.mp4")
    total = FPS * SECONDS
    indices = np.linspace(0, total - 1, args.frames).round().astype(int)
    timestamps = [i / FPS for i in indices]  # frame i is on screen from i / fps

    def ours():
        return load_video(video, timestamps_seconds=timestamps).frames

    def theirs():
        frames, _ = transformers_load_video(str(video), backend="pyav", sample_indices_fn=lambda metadata, **kw: indices)
        return frames

    ours_frames, their_frames = ours(), theirs()
    assert ours_frames.shape == their_frames.shape, (ours_frames.shape, their_frames.shape)
    assert np.array_equal(ours_frames, their_frames), "the two loaders returned different pixels"
    ours_times, their_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        theirs()
        their_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours()
        ours_times.append(time.perf_counter() - start)
    best_ours, best_theirs = min(ours_times), min(their_times)
    print(f"video: {SECONDS // 60} min {WIDTH}x{HEIGHT} H.264 @ {FPS} fps, keyframe every {KEYFRAME_SECONDS} s; "
          f"{args.frames} frames, identical pixels")
    print(f"transformers load_video(pyav): {best_theirs:.3f} s   tpo load_video (seek): {best_ours:.3f} s   "
          f"speed-up {best_theirs / best_ours:.1f}x")


if __name__ == "__main__":
    main()
