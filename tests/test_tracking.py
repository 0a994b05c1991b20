"""Tracking: SAM2 streaming (`MaskHead.track_stream`) equals transformers' offline propagation while holding only
its memory window; LaSOT / GOT-10k readers on fixtures in their layouts, bad sequences; `track_sequence` from the
first box (mask head with the box prompt, or SAM2's box prompt alone) and the toolkits' result files."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_inputs import TRACK_HEIGHT, TRACK_WIDTH, write_got10k, write_lasot
from transformers import LlavaForConditionalGeneration
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import tpo.modeling_tpo.mask_head as mask_head_module
from tpo import TPOForConditionalGeneration
from tpo.modeling_tpo.mask_head import MaskHead
from tpo.processing.processing_tpo import TPOProcessor
from tpo.processing.tracking_readers import read_got10k, read_lasot
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_sam2_config
from tpo.training.tracking import TrackingConfig, first_frame_mask_logits, track_sequence, write_tracking_results

SAM2_SIZE = 64
HEIGHT, WIDTH = TRACK_HEIGHT, TRACK_WIDTH  # the LaSOT / GOT-10k fixtures' frames


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------
# Streaming through SAM2's memory
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    config = tiny_sam2_config(SAM2_SIZE)
    config.num_maskmem, config.max_object_pointers_in_encoder = 4, 5  # a memory window of 4 frames: short videos
    return MaskHead(32, config).eval()


def _offline(head, frames, box):
    """transformers' own offline propagation: the whole video in the session."""
    session = Sam2VideoInferenceSession(video=frames, video_height=SAM2_SIZE, video_width=SAM2_SIZE, dtype=torch.float32)
    obj = session.obj_id_to_idx(1)
    session.add_point_inputs(obj, 0, {"point_coords": box.reshape(1, 1, 2, 2),
                                      "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})
    session.obj_with_new_inputs = [1]
    with torch.no_grad():
        return torch.stack([out.pred_masks.reshape(-1, SAM2_SIZE // 4, SAM2_SIZE // 4)[0]
                            for out in head.sam2.propagate_in_video_iterator(session, start_frame_idx=0)])


def test_streaming_equals_offline_propagation_and_keeps_only_the_memory_window(head, monkeypatch):
    frames = torch.randn(9, 3, SAM2_SIZE, SAM2_SIZE, generator=torch.Generator().manual_seed(1))
    box = torch.tensor([8.0, 10.0, 40.0, 50.0])
    expected = _offline(head, frames, box)
    sizes, read = [], []
    forget = mask_head_module._KnownLengthSession.forget_before

    def recording(session, frame_idx, obj_idx):
        forget(session, frame_idx, obj_idx)
        sizes.append((len(session.processed_frames), len(session.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"])))

    def reader():
        for index, frame in enumerate(frames):
            read.append(index)
            yield frame

    monkeypatch.setattr(mask_head_module._KnownLengthSession, "forget_before", recording)
    steps = head.track_stream(reader(), initial_box=box, num_frames=len(frames))
    logits = []
    for index, step in enumerate(steps):
        assert read[-1] == index  # frame index+1 is not read before frame index's result is out
        logits.append(step["mask_logits"])
    got = torch.nn.functional.interpolate(expected[:, None], size=(SAM2_SIZE, SAM2_SIZE), mode="bilinear",
                                          align_corners=False)[:, 0]
    assert torch.equal(torch.stack(logits), got)  # the same operations on the same numbers: bit-identical
    window = max(head.sam2.num_maskmem - 1, head.sam2.config.max_object_pointers_in_encoder - 1)
    assert window == 4 < len(frames) - 1
    assert all(pixels == 0 and states <= window for pixels, states in sizes)
    assert sizes[-1][1] == window  # the window is full at the end, never more


def test_stream_boxes_are_the_masks_boxes_and_prompts_are_checked(head):
    frames = torch.randn(3, 3, SAM2_SIZE, SAM2_SIZE)
    initial = torch.full((16, 16), -10.0)
    initial[4:8, 2:10] = 10.0  # rows 16..32, columns 8..40 at 64 px
    steps = list(head.track_stream(iter(frames), initial_mask_logits=initial))
    assert steps[0]["boxes_xyxy"].tolist() == [8.0, 16.0, 40.0, 32.0] and bool(steps[0]["visible"])
    with pytest.raises(ValueError, match="exactly one frame-0 prompt"):
        next(head.track_stream(iter(frames)))


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------
def test_lasot_reader(tmp_path):
    write_lasot(tmp_path, "airplane-1", occluded=(2,), out_of_view=(5,))
    write_lasot(tmp_path, "bird-3", count=6)
    (tmp_path / "testing_set.txt").write_text("bird-3\n")
    sequences = {s.name: s for s in read_lasot(str(tmp_path))}
    airplane = sequences["airplane-1"]
    assert len(airplane.frame_paths) == 8 and airplane.frame_paths[0].endswith("img/00000001.jpg")
    assert airplane.boxes_xywh.shape == (8, 4) and airplane.first_box_xywh.tolist() == [4, 10, 16, 20]
    assert airplane.visible.tolist() == [i not in (2, 5) for i in range(8)]
    assert airplane.image_size == (HEIGHT, WIDTH) and airplane.description == "white rectangle moving right"
    assert airplane.annotated
    assert [s.name for s in read_lasot(str(tmp_path), str(tmp_path / "testing_set.txt"))] == ["bird-3"]


def test_got10k_reader_val_and_test_layouts(tmp_path):
    write_got10k(tmp_path / "val")
    (val,) = read_got10k(str(tmp_path / "val"))
    assert val.visible.tolist() == [i != 3 for i in range(10)] and val.description == "ant"
    assert val.image_size == (HEIGHT, WIDTH) and val.annotated and len(val.frame_paths) == 10
    write_got10k(tmp_path / "test", "GOT-10k_Test_000001", first_only=True)
    (test,) = read_got10k(str(tmp_path / "test"))
    assert len(test.frame_paths) == 10 and test.boxes_xywh.shape == (1, 4) and not test.annotated


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "img" / "00000005.jpg").unlink(), r"Sequence airplane-1: frame 5 \(.*00000005.jpg\) is missing"),
    (lambda f: (f / "img" / "00000008.jpg").unlink(), r"frame 8 .* is missing; .* 7 numbered frames for 8"),
    (lambda f: (f / "groundtruth.txt").write_text("4,10,0,20\n" * 8), r"groundtruth.txt line 1: the first box "
                                                                      r"\[4.0, 10.0, 0.0, 20.0\] is empty"),
    (lambda f: (f / "groundtruth.txt").write_text("70,10,5,5\n" * 8), r"line 1: the first box .* lies outside the "
                                                                       r"64x48 frame"),
    (lambda f: (f / "groundtruth.txt").write_text("4,10,16\n"), r"groundtruth.txt line 1: '4,10,16' is not four"),
    (lambda f: (f / "full_occlusion.txt").write_text("0,0"), r"full_occlusion.txt: 2 flags for 8 frames"),
])
def test_bad_sequences_name_the_folder_and_file(tmp_path, damage, message):
    damage(write_lasot(tmp_path))
    with pytest.raises(ValueError, match=message):
        read_lasot(str(tmp_path))


def test_unknown_sequences_and_empty_roots(tmp_path):
    write_lasot(tmp_path)
    with pytest.raises(ValueError, match=r"no sequence folder for \['cat-9'\]"):
        read_lasot(str(tmp_path), ["cat-9"])
    with pytest.raises(ValueError, match="no <sequence>/groundtruth.txt found"):
        read_got10k(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------
# Tracking a sequence
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracker():
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(
        LlavaForConditionalGeneration(tiny_llava_config(tokenizer)), tasks=["mask"], tokenizer=tokenizer,
        sam2_config=tiny_sam2_config(SAM2_SIZE), mask_head_config={"box_prompt": True,
                                                                   "box_prompt_config": {"heatmap_dim": 16}})
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=4)
    return model.eval(), processor


def test_track_sequence_from_the_first_box(tmp_path, tracker):
    model, processor = tracker
    write_lasot(tmp_path)
    (sequence,) = read_lasot(str(tmp_path))
    result = track_sequence(model, processor, sequence)
    assert result.boxes_xywh.shape == (8, 4) and result.seconds_per_frame.shape == (8,)
    assert result.boxes_xywh[0].tolist() == [4, 10, 16, 20]  # frame 0: the initialisation box
    assert (result.seconds_per_frame > 0).all()
    # the same as streaming by hand from the mask head's frame-0 mask (the first box as its box prompt)
    frame = np.asarray(Image.open(sequence.frame_paths[0]).convert("RGB"))
    first = first_frame_mask_logits(model, processor, sequence, frame)
    frames = processor.sam2_inputs([np.asarray(Image.open(p).convert("RGB")) for p in sequence.frame_paths])
    reference = model.mask_head.track(None, frames["sam2_pixel_values"], initial_mask_logits=first)
    scale = np.array([WIDTH, HEIGHT, WIDTH, HEIGHT]) / SAM2_SIZE
    for index in range(1, 8):
        if bool(reference["visible"][index]):
            x0, y0, x1, y1 = reference["boxes_xyxy"][index].double().numpy() * scale
            np.testing.assert_allclose(result.boxes_xywh[index], [x0, y0, x1 - x0, y1 - y0], rtol=0, atol=1e-9)
    # the given box replaces the localiser's predicted box as the box prompt: it changes frame 0's mask
    embeddings = torch.randn(1, 1, model.config.get_text_config().hidden_size)
    sam2 = frames["sam2_pixel_values"][:1]
    assert not torch.equal(model.mask_head(embeddings, sam2_pixel_values=sam2)["pred_mask_logits"],
                           model.mask_head(embeddings, sam2_pixel_values=sam2,
                                           input_boxes=torch.tensor([[5.0, 13.0, 21.0, 40.0]]))["pred_mask_logits"])
    sam2_only = track_sequence(model, processor, sequence, TrackingConfig(first_frame="sam2_box"))
    box = torch.tensor([4.0, 10.0, 20.0, 30.0]) / torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT]) * SAM2_SIZE
    alone = model.mask_head.track(None, frames["sam2_pixel_values"], initial_box=box)
    assert sam2_only.found.tolist() == alone["visible"].tolist()


def test_lost_target_boxes_and_result_files(tmp_path):
    from tpo.training.tracking import TrackResult

    boxes = np.array([[4, 10, 16, 20], [5.5, 10, 16, 20.25], [5.5, 10, 16, 20.25]])
    result = TrackResult("airplane-1", boxes, np.array([True, True, False]), np.array([0.5, 0.25, 0.125]))
    lasot = write_tracking_results(result, str(tmp_path / "lasot"), "lasot")
    assert lasot == tmp_path / "lasot" / "airplane-1.txt"
    assert lasot.read_text().splitlines() == ["4.000,10.000,16.000,20.000", "5.500,10.000,16.000,20.250",
                                              "5.500,10.000,16.000,20.250"]
    assert (tmp_path / "lasot" / "airplane-1_time.txt").read_text().split() == ["0.500000", "0.250000", "0.125000"]
    got = write_tracking_results(result, str(tmp_path / "got"), "got10k")
    assert got == tmp_path / "got" / "airplane-1" / "airplane-1_001.txt"
    assert (tmp_path / "got" / "airplane-1" / "airplane-1_time.txt").exists()
    with pytest.raises(ValueError, match="Unknown tracking protocol 'otb'"):
        write_tracking_results(result, str(tmp_path), "otb")
    with pytest.raises(ValueError, match="lost_target 'last'"):
        TrackingConfig(lost_target="last")


def test_tracking_benchmark_runs(tmp_path):
    """benchmarks/bench_tracking.py's measurement on a 4-frame sequence gives positive, finite figures."""
    import math

    from script_loader import load_script

    bench = load_script("benchmarks/bench_tracking.py")
    model = bench.build_checkpoint(tmp_path / "checkpoint")
    bench.write_sequence(tmp_path / "lasot", "square-1", 4)
    result = bench.measure_predict(model, str(tmp_path / "lasot"), str(tmp_path / "out"))
    assert result["frames"] == 4
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("tracking_fps", "wall_fps", "peak_rss_mib"))
    assert result["tracking_fps"] == pytest.approx(4 / result["tracking_seconds"])
    assert result["wall_fps"] == pytest.approx(4 / result["wall_seconds"])
    assert result["tracking_seconds"] <= result["wall_seconds"]  # the frames' times are inside the run's
