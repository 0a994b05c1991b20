"""PyAV loading: every returned frame is read back from the frame number drawn into it."""

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from tpo.processing.video import (
    VideoLoadError,
    load_frame_folder,
    load_video,
    probe_video,
    sample_timestamps,
)

BITS, BLOCK, HEIGHT = 8, 16, 48  # frame number as 8 black/white blocks of 16 px, one row
WIDTH = BITS * BLOCK


def numbered_frame(number: int) -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8: bit k of `number` is block k (white = 1), with a grey band below."""
    image = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    for bit in range(BITS):
        image[:32, bit * BLOCK:(bit + 1) * BLOCK] = 255 if (number >> bit) & 1 else 0
    return image


def read_number(frame: np.ndarray) -> int:
    blocks = [frame[4:28, bit * BLOCK + 4:(bit + 1) * BLOCK - 4].mean() for bit in range(BITS)]
    return sum(1 << bit for bit, value in enumerate(blocks) if value > 128)


def read_numbers(frames: np.ndarray) -> list[int]:
    return [read_number(frame) for frame in frames]


def write_video(path, count: int, fps: int = 25, codec: str = "libx264", gop: int = 10, pts_ms: list[int] | None = None,
                options: dict | None = None):
    """Frames 0..count-1 with their numbers drawn in. `pts_ms`: explicit presentation times in
    milliseconds (variable frame rate)."""
    container = av.open(str(path), "w", options=options or {})
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    if codec == "libx264":  # B-frames on (decode order differs from display order), short GOP, lossless-ish
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "2", "crf": "10",
                          "preset": "veryfast"}
    else:
        stream.codec_context.gop_size = gop
        stream.bit_rate = 2_000_000
    if pts_ms is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    for index in range(count):
        frame = av.VideoFrame.from_ndarray(numbered_frame(index), format="rgb24")
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[index], Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def video_25fps(tmp_path_factory):
    """6 s at 25 fps (150 frames), a keyframe every 10 frames, B-frames."""
    return write_video(tmp_path_factory.mktemp("video") / "numbers.mp4", 150)


def test_drawn_numbers_read_back():
    assert [read_number(numbered_frame(n)) for n in (0, 1, 77, 149, 255)] == [0, 1, 77, 149, 255]


def test_probe_reports_stream_facts(video_25fps):
    metadata = probe_video(video_25fps)
    assert (metadata.width, metadata.height) == (WIDTH, HEIGHT)
    assert metadata.fps == pytest.approx(25.0)
    assert metadata.duration_seconds == pytest.approx(6.0, abs=0.05)
    assert metadata.num_frames == 150


def test_timestamps_mode_returns_the_frame_on_screen(video_25fps):
    # Unsorted, repeated, backwards, near and far (> 1 s: seek) targets, on and between frame times.
    times = [3.0, 0.0, 0.039, 0.041, 5.96, 3.0, 1.234, 0.5, 2.0 - 1e-4, 4.4]
    clip = load_video(video_25fps, timestamps_seconds=times)
    expected = [75, 0, 0, 1, 149, 75, 30, 12, 49, 110]  # floor(t * 25)
    assert clip.frames.shape == (len(times), HEIGHT, WIDTH, 3) and clip.frames.dtype == np.uint8
    assert read_numbers(clip.frames) == expected
    assert clip.metadata.timestamps_seconds == pytest.approx([n / 25 for n in expected], abs=1e-6)


def test_every_frame_in_order_and_without_threads(video_25fps):
    times = [i / 25 for i in range(150)]
    assert read_numbers(load_video(video_25fps, timestamps_seconds=times).frames) == list(range(150))
    threaded = load_video(video_25fps, timestamps_seconds=times[::7]).frames
    plain = load_video(video_25fps, timestamps_seconds=times[::7], threads=False).frames
    assert np.array_equal(threaded, plain)


def test_uniform_mode_takes_segment_middles(video_25fps):
    clip = load_video(video_25fps, num_frames=4)
    # duration 6 s, 4 segments of 1.5 s: middles 0.75, 2.25, 3.75, 5.25 s -> frames 18, 56, 93, 131 (floor(t * 25))
    assert read_numbers(clip.frames) == [18, 56, 93, 131]
    assert clip.metadata.timestamps_seconds == pytest.approx([18 / 25, 56 / 25, 93 / 25, 131 / 25])


def test_fps_mode(video_25fps):
    clip = load_video(video_25fps, fps=0.5)
    # every 2 s, at the middle of each interval: 1, 3, 5 s -> frames 25, 75, 125
    assert read_numbers(clip.frames) == [25, 75, 125]


def test_sample_timestamps_hand_values():
    assert sample_timestamps(10.0, num_frames=5) == pytest.approx([1, 3, 5, 7, 9])
    assert sample_timestamps(3.0, fps=2) == pytest.approx([0.25, 0.75, 1.25, 1.75, 2.25, 2.75])
    assert sample_timestamps(0.1, fps=1) == pytest.approx([0.5])  # at least one frame
    with pytest.raises(ValueError, match="exactly one"):
        sample_timestamps(3.0)
    with pytest.raises(ValueError, match="num_frames"):
        sample_timestamps(3.0, num_frames=0)


def test_sampling_modes_are_exclusive(video_25fps):
    with pytest.raises(ValueError, match="exactly one"):
        load_video(video_25fps, num_frames=4, timestamps_seconds=[1.0])
    with pytest.raises(ValueError, match="exactly one"):
        load_video(video_25fps)


def test_times_outside_the_video_clamp_to_first_and_last_frame(video_25fps):
    clip = load_video(video_25fps, timestamps_seconds=[-1.0, 7.5])
    assert read_numbers(clip.frames) == [0, 149]


def test_variable_frame_rate(tmp_path):
    pts_ms = [0, 40, 80, 500, 520, 1500, 1510, 1520, 3000, 3100]
    path = write_video(tmp_path / "vfr.mkv", len(pts_ms), codec="mpeg4", pts_ms=pts_ms)
    times = [0.0, 0.3, 0.5, 0.51, 1.0, 1.515, 2.9, 3.05, 3.2]
    clip = load_video(path, timestamps_seconds=times)
    expected = [0, 2, 3, 3, 4, 6, 7, 8, 9]  # the last frame shown at or before each time
    assert read_numbers(clip.frames) == expected
    assert clip.metadata.timestamps_seconds == pytest.approx([pts_ms[i] / 1000 for i in expected])


def test_stream_without_frame_count(tmp_path):
    path = write_video(tmp_path / "noframes.mkv", 50, fps=10, codec="mpeg4")
    metadata = probe_video(path)
    assert metadata.num_frames is None  # Matroska stores no frame count
    assert metadata.duration_seconds == pytest.approx(5.0, abs=0.15)
    clip = load_video(path, num_frames=5)
    # middles of 1-s segments: 0.5, 1.5, ... s -> frames 5, 15, 25, 35, 45
    assert read_numbers(clip.frames) == [5, 15, 25, 35, 45]


def test_raw_stream_without_timestamps_or_seeking(tmp_path):
    # An elementary .h264 stream: no container, no timestamps, no duration, cannot seek. FFmpeg assumes 25 fps.
    path = write_video(tmp_path / "raw.h264", 50, fps=25)
    metadata = probe_video(path)
    assert metadata.duration_seconds == pytest.approx(2.0) and metadata.num_frames == 50  # decoded once to count
    clip = load_video(path, timestamps_seconds=[1.96, 0.5, 0.0, 1.5])
    assert read_numbers(clip.frames) == [49, 12, 0, 37]
    assert clip.metadata.timestamps_seconds == pytest.approx([1.96, 0.48, 0.0, 1.48])


def test_very_short_video_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", 3, fps=10)
    clip = load_video(path, num_frames=8)
    assert clip.frames.shape[0] == 8
    # 0.3 s in 8 segments: middles 0.01875, 0.05625, 0.09375, 0.13125, 0.16875, 0.20625, 0.24375, 0.28125 s
    # -> frames floor(t * 10)
    assert read_numbers(clip.frames) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert clip.metadata.timestamps_seconds == pytest.approx([0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.2])


def test_empty_request_keeps_frame_shape(video_25fps):
    assert load_video(video_25fps, timestamps_seconds=[]).frames.shape == (0, HEIGHT, WIDTH, 3)


# ---------------------------------------------------------------------------------------------------
# Errors name the file
# ---------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "missing.mp4"
    with pytest.raises(VideoLoadError, match="missing.mp4.*does not exist"):
        load_video(path, num_frames=2)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoLoadError, match="empty.mp4.*empty"):
        load_video(path, num_frames=2)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoLoadError, match="corrupt.mp4.*corrupt"):
        probe_video(path)
    assert issubclass(VideoLoadError, ValueError)


@pytest.mark.parametrize("name, codec, options, message", [
    # moov atom first (faststart), so a cut mp4 still opens; FFmpeg then fails while decoding
    ("truncated.mp4", "libx264", {"movflags": "faststart"}, "truncated.mp4.*corrupt or truncated"),
    # Matroska declares its duration up front and decoding just stops early: the loader notices
    ("truncated.mkv", "mpeg4", {}, r"truncated.mkv.*truncated: it declares 6.00 s but decoding stops"),
])
def test_truncated_mid_stream(tmp_path, name, codec, options, message):
    whole = write_video(tmp_path / f"whole{name[-4:]}", 150, codec=codec, options=options)
    data = whole.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoLoadError, match=message):
        load_video(path, timestamps_seconds=[0.2, 5.0])


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.wav"
    container = av.open(str(path), "w")
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    with pytest.raises(VideoLoadError, match="audio.wav.*no video stream"):
        load_video(path, num_frames=1)


# ---------------------------------------------------------------------------------------------------
# Image-sequence videos (MeViS JPEG folders)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def frame_folder(tmp_path):
    folder = tmp_path / "video_a"
    folder.mkdir()
    for index in range(12):
        Image.fromarray(numbered_frame(index)).save(folder / f"{index:05d}.jpg", quality=95)
    (folder / "notes.txt").write_text("not a frame")
    return folder


def test_frame_folder_by_timestamps(frame_folder):
    clip = load_frame_folder(frame_folder, fps=6.0, timestamps_seconds=[0.0, 1.0, 0.5, 1.99, 5.0])
    assert read_numbers(clip.frames) == [0, 6, 3, 11, 11]
    assert clip.metadata.timestamps_seconds == pytest.approx([0.0, 1.0, 0.5, 11 / 6, 11 / 6])
    assert clip.metadata.num_frames == 12 and clip.metadata.duration_seconds == pytest.approx(2.0)
    assert (clip.metadata.height, clip.metadata.width) == (HEIGHT, WIDTH)


def test_frame_folder_uniform_and_fps_modes(frame_folder):
    # 2 s; 4 segments: middles 0.25, 0.75, 1.25, 1.75 s at 6 fps -> frames 1, 4, 7, 10
    assert read_numbers(load_frame_folder(frame_folder, fps=6.0, num_frames=4).frames) == [1, 4, 7, 10]
    # 1 frame per second, at 0.5 and 1.5 s -> frames 3 and 9
    assert read_numbers(load_frame_folder(frame_folder, fps=6.0, sample_fps=1.0).frames) == [3, 9]
    paths = sorted(str(p) for p in frame_folder.glob("*.jpg"))
    assert read_numbers(load_frame_folder(paths, fps=6.0, timestamps_seconds=[0.7]).frames) == [4]


def test_frame_folder_errors(tmp_path, frame_folder):
    with pytest.raises(VideoLoadError, match="nowhere.*does not exist"):
        load_frame_folder(tmp_path / "nowhere", fps=6.0, num_frames=2)
    (tmp_path / "blank").mkdir()
    with pytest.raises(VideoLoadError, match="blank.*no image files"):
        load_frame_folder(tmp_path / "blank", fps=6.0, num_frames=2)
    (frame_folder / "00003.jpg").write_bytes(b"broken")
    with pytest.raises(VideoLoadError, match="00003.jpg.*cannot be read"):
        load_frame_folder(frame_folder, fps=6.0, timestamps_seconds=[0.5])
    with pytest.raises(ValueError, match="fps must be > 0"):
        load_frame_folder(frame_folder, fps=0.0, num_frames=2)
