"""Video loading with PyAV: exact, seek-based frame sampling (README.md, "Data", "Video").

`load_video` returns, for each requested time, the frame on screen at that time with its true presentation
time, seeking to the keyframe before a target instead of decoding the whole video (`load_video` documents
the rules); `load_frame_folder` loads image-sequence videos (MeViS / Ref-YouTube-VOS JPEG folders) at the
folder's frame rate: frame i is on screen during [i / fps, (i + 1) / fps).
"""

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .images import ImageFileError, image_size, read_image_rgb

logger = logging.getLogger(__name__)

# A target further ahead than this is reached by seeking (to the keyframe before it) rather than by
# decoding forward; about half the keyframe interval of web video (a keyframe every 2 s).
FORWARD_DECODE_SECONDS = 1.0
# Frames of at least this many pixels are decoded with FFmpeg's threads (see `load_video`).
THREADED_DECODE_MIN_PIXELS = 320 * 240


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
    """Decoded frames (T, H, W, 3) uint8 RGB, in the order of the requested times, and the metadata."""

    frames: np.ndarray
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
        audio_streams = len(container.streams.audio)  # counted before closing: a closed container lists none
        container.close()
        raise VideoLoadError(f"File {path!r} has no video stream (audio streams: {audio_streams}); give a video file.")
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
            step = 1.0 / metadata.fps if metadata.fps > 0 else 0.0
            last, count = 0.0, 0
            for frame in container.decode(stream):
                # a raw elementary stream (.h264) has no timestamps: its frames are 1/fps apart
                last = float(frame.time) if frame.time is not None else count * step
                count += 1
            metadata.duration_seconds = last + step
            metadata.num_frames = metadata.num_frames or count
        return metadata
    finally:
        container.close()


def check_timestamps(timestamps_seconds, where: str) -> list[float]:
    """The times as floats; ValueError naming `where` and the first non-finite one (NaN or inf cannot be
    sought to: they used to end in a bare `ValueError` / `OverflowError` from the seek)."""
    times = [float(t) for t in timestamps_seconds]
    bad = next((i for i, t in enumerate(times) if not math.isfinite(t)), None)
    if bad is not None:
        raise ValueError(f"{where}: timestamps_seconds[{bad}] is {times[bad]}; give finite times in seconds.")
    return times


def sample_timestamps(duration_seconds: float, num_frames: int | None = None, fps: float | None = None) -> list[float]:
    """Uniform times: the middle of `num_frames` equal segments, or every 1/fps seconds (middles)."""
    if (num_frames is None) == (fps is None):
        raise ValueError("Give exactly one of `num_frames` and `fps`.")
    if not math.isfinite(duration_seconds) or duration_seconds < 0:
        raise ValueError(f"A video duration of {duration_seconds} s cannot be sampled; give a finite duration >= 0.")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
        return [(i + 0.5) * duration_seconds / num_frames for i in range(num_frames)]
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    count = max(1, int(math.floor(duration_seconds * fps)))
    return [(i + 0.5) / fps for i in range(count)]


def load_video(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
               timestamps_seconds: list[float] | None = None, threads: bool | None = None) -> VideoClip:
    """Decode the frames at the requested times.

    Each requested time gives the frame on screen at that time: the last frame whose presentation time is
    <= t (so `i / fps` gives frame i), the first frame for earlier times, the last one for later times.
    Targets are visited in increasing order; the loader seeks (to the keyframe before a target) when the
    target is more than FORWARD_DECODE_SECONDS past the last decoded frame, and otherwise decodes forward.
    A video with fewer frames than asked for repeats frames (one per requested time, visible in
    `metadata.timestamps_seconds`). Streams without a frame count (mkv, webm) have `num_frames=None`; a stream
    without a duration is decoded once to measure it; variable frame rate needs nothing special (frames are
    chosen by presentation time, never by index); a stream that cannot seek and has no timestamps (a raw
    .h264 file) is decoded forward from the start, its frames taken as 1/fps apart.

    Give exactly one of `num_frames` (uniform: middle of N equal segments), `fps` (sampling rate, frames
    per second) or `timestamps_seconds` (seconds from the start of the stream, any order, repeats allowed).
    `threads`: FFmpeg's frame/slice threads; None (default) uses them for frames of at least
    THREADED_DECODE_MIN_PIXELS pixels, where they pay off (for small frames starting the threads costs
    more than it saves).
    Returns frames (T, H, W, 3) uint8 RGB in the order of the requested times, and metadata whose
    `timestamps_seconds` are the returned frames' true presentation times (seconds from the stream start).
    Raises `VideoLoadError` (a ValueError naming the file) for a missing, empty, corrupt or truncated file
    or one without a video stream.
    """
    import av

    path = str(path)
    given = sum(value is not None for value in (num_frames, fps, timestamps_seconds))
    if given != 1:
        raise ValueError(f"load_video({path!r}): give exactly one of num_frames, fps and timestamps_seconds "
                         f"(got {given}).")
    if timestamps_seconds is not None:
        timestamps_seconds = check_timestamps(timestamps_seconds, f"load_video({path!r})")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        metadata = _stream_metadata(path, container, stream)
        if threads or (threads is None and metadata.width * metadata.height >= THREADED_DECODE_MIN_PIXELS):
            stream.thread_type = "AUTO"
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


class _ForwardDecoder:
    """Frames on screen at increasing target times (absolute stream seconds), seeking only when a target
    is more than FORWARD_DECODE_SECONDS past the last decoded frame."""

    def __init__(self, container, stream, path: str, duration_seconds: float):
        self.container, self.stream, self.path = container, stream, path
        self.time_base = float(stream.time_base)
        self.start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        self.fps = float(stream.average_rate or 0) or 25.0
        self.declared_end = self.start + duration_seconds
        self.tolerance = max(3.0 / self.fps, 0.25)  # how early a complete stream may end
        self.seekable, self.from_start, self.decoded = True, True, 0
        self.decoder = None
        self.previous = self.pending = None  # (frame, time): last frame at or before the target / first after it
        self.position = -math.inf  # time of the last decoded frame
        self.reopened = None  # a fresh container, when a failed seek spoilt the first one

    def close(self) -> None:
        if self.reopened is not None:
            self.reopened.close()

    def frame_at(self, target: float):
        """(frame, time) on screen at `target` seconds (absolute); targets must not decrease."""
        if self.decoder is None or (self.seekable and target - self.position > FORWARD_DECODE_SECONDS):
            self._restart(target)
        while self.pending is None or self.pending[1] <= target + 1e-9:
            if self.pending is not None:  # the frame past the last target is at or before this one
                self.previous, self.pending = self.pending, None
                continue
            frame = next(self.decoder, None)
            if frame is None:
                self._check_complete(target)
                break
            time = self._frame_time(frame)
            if time <= target + 1e-9:
                self.previous = (frame, time)
            else:
                self.pending = (frame, time)
        chosen = self.previous if self.previous is not None else self.pending
        if chosen is None:
            raise VideoLoadError(f"Video file {self.path!r} yielded no frame near {target - self.start:.3f} s; it may be "
                                 "truncated: re-download or re-encode it.")
        return chosen

    def _restart(self, target: float) -> None:
        import av

        if self.seekable:
            try:
                self.container.seek(round(target / self.time_base), stream=self.stream, backward=True, any_frame=False)
                self.from_start = False
            except av.error.FFmpegError as error:
                # e.g. a raw .h264 stream: not seekable, and the failed seek leaves the demuxer at the end,
                # so decode forward from the start of a fresh container
                logger.debug("%s cannot seek (%s); decoding forward from the start", self.path, error)
                self.seekable = False
                thread_type = self.stream.thread_type
                self.reopened = self.container = _open(self.path)
                self.stream = self.container.streams.video[0]
                self.stream.thread_type = thread_type
                self.decoder = None
        if self.seekable or self.decoder is None:
            self.decoder = self.container.decode(self.stream)
            self.previous = self.pending = None
            self.position = -math.inf

    def _frame_time(self, frame) -> float:
        if frame.pts is not None:
            time = float(frame.pts * self.time_base)
        elif self.from_start:  # no timestamps (raw stream): frames are 1/fps apart from the start
            time = self.start + self.decoded / self.fps
        else:
            time = self.position + 1.0 / self.fps
        self.decoded += 1
        self.position = time
        return time

    def _check_complete(self, target: float) -> None:
        """The stream ended: fine near its declared end, a truncated file before it."""
        if self.declared_end - max(self.position, self.start) > self.tolerance and target < self.declared_end - self.tolerance:
            reached = "no frame" if self.position == -math.inf else f"{self.position - self.start:.2f} s"
            raise VideoLoadError(
                f"Video file {self.path!r} is truncated: it declares {self.declared_end - self.start:.2f} s but decoding "
                f"stops at {reached} (asked for {target - self.start:.2f} s); re-download or re-encode it."
            )


def _decode_at(container, stream, targets: list[float], path: str, duration_seconds: float) -> tuple[np.ndarray, list[float]]:
    """Frames (T, H, W, 3) on screen at each target time (seconds from the stream start) and their times,
    in the order of `targets`; the targets are visited in increasing order."""
    if not targets:
        context = stream.codec_context
        return np.zeros((0, context.height, context.width, 3), np.uint8), []
    decoder = _ForwardDecoder(container, stream, path, duration_seconds)
    results: dict[int, tuple[np.ndarray, float]] = {}
    try:
        for index in sorted(range(len(targets)), key=lambda i: targets[i]):
            frame, time = decoder.frame_at(max(targets[index], 0.0) + decoder.start)
            results[index] = (frame.to_ndarray(format="rgb24"), time - decoder.start)
    finally:
        decoder.close()
    frames = np.stack([results[i][0] for i in range(len(targets))])
    return frames, [results[i][1] for i in range(len(targets))]


FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_frame_files(folder: str | os.PathLike) -> list[str]:
    """The image files of a frame folder, sorted by name (MeViS names frames 00000.jpg, 00001.jpg, ...)."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise VideoLoadError(f"Frame folder {folder!r} does not exist; check the dataset's frames directory.")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS))
    if not names:
        raise VideoLoadError(f"Frame folder {folder!r} holds no image files ({', '.join(FRAME_EXTENSIONS)}); "
                             "extract the frames there or fix the path.")
    return [os.path.join(folder, n) for n in names]


def load_frame_folder(frames: str | os.PathLike | list[str], fps: float, timestamps_seconds: list[float] | None = None,
                      num_frames: int | None = None, sample_fps: float | None = None) -> VideoClip:
    """Frames of an image-sequence video (a folder of image files, or their list in order) whose frame
    rate is `fps`; frame i is on screen during [i / fps, (i + 1) / fps).

    Give exactly one of `timestamps_seconds`, `num_frames` (middle of N equal segments of the
    len(frames) / fps seconds) or `sample_fps`. Only the chosen files are read. Returns (T, H, W, 3) uint8
    RGB and metadata whose `timestamps_seconds` are the chosen frames' start times i / fps.
    """
    frame_paths = list_frame_files(frames) if isinstance(frames, (str, os.PathLike)) else [str(p) for p in frames]
    if not frame_paths:
        raise VideoLoadError("An image-sequence video has no frames; give a non-empty list of frame files.")
    if fps <= 0:
        raise ValueError(f"fps must be > 0 for an image-sequence video ({os.path.dirname(frame_paths[0])!r}), got {fps}.")
    duration = len(frame_paths) / fps
    if timestamps_seconds is None:
        if num_frames is None and sample_fps is None:
            raise ValueError("load_frame_folder: give one of timestamps_seconds, num_frames and sample_fps.")
        timestamps_seconds = sample_timestamps(duration, num_frames=num_frames, fps=sample_fps)
    elif num_frames is not None or sample_fps is not None:
        raise ValueError("load_frame_folder: give only one of timestamps_seconds, num_frames and sample_fps.")
    else:
        timestamps_seconds = check_timestamps(timestamps_seconds, f"load_frame_folder({os.path.dirname(frame_paths[0])!r})")
    # The 1e-9 keeps t = i / fps on frame i despite floating-point rounding of the division.
    indices = [min(max(int(math.floor(t * fps + 1e-9)), 0), len(frame_paths) - 1) for t in timestamps_seconds]
    decoded: dict[int, np.ndarray] = {}
    for i in indices:
        if i not in decoded:
            decoded[i] = _read_frame_file(frame_paths[i])
    shapes = {decoded[i].shape for i in decoded}
    if len(shapes) > 1:
        raise VideoLoadError(f"Frames of {os.path.dirname(frame_paths[0])!r} differ in size {sorted(shapes)}; "
                             "resize them to one size.")
    height, width = _image_size(frame_paths[0])
    stacked = np.stack([decoded[i] for i in indices]) if indices else np.zeros((0, height, width, 3), np.uint8)
    metadata = VideoMetadata(path=os.path.dirname(frame_paths[0]), fps=float(fps), duration_seconds=duration,
                             width=width, height=height, num_frames=len(frame_paths),
                             timestamps_seconds=[i / fps for i in indices])
    return VideoClip(frames=stacked, metadata=metadata)


def _read_frame_file(path: str) -> np.ndarray:
    try:
        return read_image_rgb(path)
    except ImageFileError as error:
        raise VideoLoadError(f"Frame {error}; re-extract the frame or drop the video.") from error


def _image_size(path: str) -> tuple[int, int]:
    try:
        return image_size(path)
    except ImageFileError as error:
        raise VideoLoadError(f"Frame {error}; re-extract the frame or drop the video.") from error
