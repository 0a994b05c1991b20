"""Video loading with PyAV: exact, seek-based frame sampling.

For each requested time the loader returns the frame on screen at that time (the last frame whose
presentation time is <= t; the first frame for times before it) with its true presentation time.
Targets are visited in order; the loader seeks (to the keyframe before a target) only when the target
lies beyond the current GOP, and otherwise decodes forward, so 16 frames of a 5-minute video cost 16
short GOP decodes instead of decoding the whole video. The cost per frame is bounded by the keyframe
interval (a seek decodes from the previous keyframe).

Sampling modes: `num_frames` (middle of N equal segments), `fps` (every 1/fps seconds, at the middle of
each interval), or explicit `timestamps_seconds`. Very short videos: the returned frames follow the
requested times, so a 3-frame video sampled at 8 times repeats frames (their timestamps say so).
"""

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

# A target further ahead than this is reached by seeking (to the keyframe before it) rather than by
# decoding forward; about half the keyframe interval of web video (a keyframe every 2 s).
FORWARD_DECODE_SECONDS = 1.0


class VideoLoadError(ValueError):
    """A video cannot be read; the message names the file and what to do."""


@dataclass
class VideoMetadata:
    """What a video stream says about itself (`num_frames` may be None: not every container knows)."""

    path: str
    fps: float
    duration_seconds: float
    width: int
    height: int
    num_frames: int | None = None
    timestamps_seconds: list[float] = field(default_factory=list)  # of the returned frames


@dataclass
class VideoClip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    metadata: VideoMetadata


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise VideoLoadError(f"Video file {path!r} does not exist; check the dataset's video folder and file names.")
    if os.path.getsize(path) == 0:
        raise VideoLoadError(f"Video file {path!r} is empty (0 bytes); re-download or re-encode it.")
    try:
        container = av.open(path)
    except av.error.FFmpegError as error:
        raise VideoLoadError(f"Video file {path!r} cannot be opened ({error}); it is corrupt or not a video.") from error
    if not container.streams.video:
        container.close()
        raise VideoLoadError(f"File {path!r} has no video stream (audio streams: {len(container.streams.audio)}); "
                             "give a video file.")
    return container


def _stream_metadata(path: str, container, stream) -> VideoMetadata:
    fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0.0)
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    num_frames = int(stream.frames) if stream.frames else None
    if duration <= 0 and num_frames and fps > 0:
        duration = num_frames / fps
    return VideoMetadata(path=path, fps=fps, duration_seconds=duration, width=stream.codec_context.width,
                         height=stream.codec_context.height, num_frames=num_frames)


def probe_video(path: str | os.PathLike) -> VideoMetadata:
    """fps, duration, size (and frame count if known) without decoding. A stream that reports no
    duration is decoded once to measure it."""
    path = str(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        metadata = _stream_metadata(path, container, stream)
        if metadata.duration_seconds <= 0:
            last, count = 0.0, 0
            for frame in container.decode(stream):
                last, count = float(frame.time or 0.0), count + 1
            step = 1.0 / metadata.fps if metadata.fps > 0 else 0.0
            metadata.duration_seconds = last + step
            metadata.num_frames = metadata.num_frames or count
        return metadata
    finally:
        container.close()


def sample_timestamps(duration_seconds: float, num_frames: int | None = None, fps: float | None = None) -> list[float]:
    """Uniform times: the middle of `num_frames` equal segments, or every 1/fps seconds (middles)."""
    if (num_frames is None) == (fps is None):
        raise ValueError("Give exactly one of `num_frames` and `fps`.")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
        return [(i + 0.5) * duration_seconds / num_frames for i in range(num_frames)]
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    count = max(1, int(math.floor(duration_seconds * fps)))
    return [(i + 0.5) / fps for i in range(count)]


def load_video(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
               timestamps_seconds: list[float] | None = None, threads: bool = True) -> VideoClip:
    """Decode the frames at the requested times (see the module docstring).

    Returns frames (T, H, W, 3) uint8 RGB in the order of the requested times, and metadata whose
    `timestamps_seconds` are the returned frames' true presentation times.
    """
    import av

    path = str(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        metadata = _stream_metadata(path, container, stream)
        if timestamps_seconds is None:
            duration = metadata.duration_seconds
            if duration <= 0:
                container.close()
                metadata = probe_video(path)
                container = _open(path)
                stream = container.streams.video[0]
                duration = metadata.duration_seconds
            timestamps_seconds = sample_timestamps(duration, num_frames=num_frames, fps=fps)
        frames, times = _decode_at(container, stream, list(timestamps_seconds), path, metadata.duration_seconds)
    except av.error.FFmpegError as error:
        raise VideoLoadError(f"Video file {path!r} is corrupt or truncated ({error}); re-encode or drop it.") from error
    finally:
        container.close()
    metadata.timestamps_seconds = times
    return VideoClip(frames=frames, metadata=metadata)


def _decode_at(container, stream, targets: list[float], path: str, duration_seconds: float) -> tuple[np.ndarray, list[float]]:
    """Frames on screen at each target time (seconds from the stream start), visiting targets in order."""
    time_base = float(stream.time_base)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    fps = float(stream.average_rate or 0) or 25.0
    declared_end = start + duration_seconds
    tolerance = max(3.0 / fps, 0.25)
    threshold = FORWARD_DECODE_SECONDS
    order = sorted(range(len(targets)), key=lambda i: targets[i])
    results: dict[int, tuple[np.ndarray, float]] = {}
    decoder = None
    previous = pending = None  # (frame, time): last frame at or before the target / first one after it
    position = -math.inf  # time of the last decoded frame
    for index in order:
        target = max(targets[index], 0.0) + start
        if decoder is None or target - position > threshold:
            container.seek(int(target / time_base), stream=stream, backward=True, any_frame=False)
            decoder = container.decode(stream)
            previous = pending = None
            position = -math.inf
        while pending is None or pending[1] <= target + 1e-9:
            if pending is not None:  # the frame past the last target is at or before this one
                previous, pending = pending, None
                continue
            frame = next(decoder, None)
            if frame is None:
                if declared_end - max(position, 0.0) > tolerance and target < declared_end - tolerance:
                    raise VideoLoadError(
                        f"Video file {path!r} is truncated: it declares {declared_end - start:.2f} s but decoding stops "
                        f"at {max(position, 0.0) - start:.2f} s (asked for {targets[index]:.2f} s); re-download or "
                        "re-encode it."
                    )
                break
            time = float(frame.pts * time_base) if frame.pts is not None else position + 1e-6
            position = time
            if time <= target + 1e-9:
                previous = (frame, time)
            else:
                pending = (frame, time)
        chosen = previous if previous is not None else pending
        if chosen is None:
            raise VideoLoadError(f"Video file {path!r} yielded no frame near {targets[index]:.3f} s; it may be truncated.")
        frame, time = chosen
        results[index] = (frame.to_ndarray(format="rgb24"), time - start)
    frames = np.stack([results[i][0] for i in range(len(targets))]) if targets else np.zeros((0, 0, 0, 3), np.uint8)
    return frames, [results[i][1] for i in range(len(targets))]


def load_frame_folder(frame_paths: list[str], fps: float, timestamps_seconds: list[float]) -> VideoClip:
    """Frames of an image-sequence video (e.g. MeViS JPEG folders) at the requested times; frame i is
    on screen during [i / fps, (i + 1) / fps)."""
    from PIL import Image

    if not frame_paths:
        raise VideoLoadError("An image-sequence video has no frames.")
    if fps <= 0:
        raise ValueError(f"fps must be > 0 for an image-sequence video, got {fps}.")
    indices = [min(max(int(math.floor(t * fps)), 0), len(frame_paths) - 1) for t in timestamps_seconds]
    frames = []
    for i in indices:
        try:
            with Image.open(frame_paths[i]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError) as error:
            raise VideoLoadError(f"Frame {frame_paths[i]!r} cannot be read ({error}).") from error
    with Image.open(frame_paths[0]) as first:
        width, height = first.size
    metadata = VideoMetadata(path=os.path.dirname(frame_paths[0]), fps=fps, duration_seconds=len(frame_paths) / fps,
                             width=width, height=height, num_frames=len(frame_paths),
                             timestamps_seconds=[i / fps for i in indices])
    return VideoClip(frames=np.stack(frames), metadata=metadata)
