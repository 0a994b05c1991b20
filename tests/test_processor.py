"""TPOProcessor: prompts, labels, targets, layouts (LLaVA, Qwen2-VL), batching, inverse transforms,
save/load (in process and where the project is not installed)."""

import copy
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from clean_env import run_clean_python
from tiny_inputs import weighted_loss
from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tpo import TPOForConditionalGeneration
from tpo.processing.collator_tpo import collate_encoded
from tpo.processing.processing_tpo import (
    ImageGeometry,
    TPOProcessor,
    decode_rle,
    encode_rle,
    frame_saliency,
    image_geometry,
    sam2_pixel_values,
    uniform_timestamps,
)
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_qwen2_vl_config


def _build(family: str, **processor_kwargs):
    tokenizer = build_tiny_tokenizer()
    if family == "llava":
        mllm = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    else:
        mllm = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config(tokenizer))
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=["temporal", "region"], tokenizer=tokenizer)
    processor = TPOProcessor.from_model_config(model.config, image_processor, tokenizer, num_frames=4, **processor_kwargs)
    return model, processor


@pytest.fixture(scope="module")
def llava():
    return _build("llava")


@pytest.fixture(scope="module")
def qwen():
    return _build("qwen2_vl")


REGION = dict(id="r1", task="region", media_type="image", media_path="x.png", query="red circle",
              image_size=[128, 96], boxes_xyxy_pixels=[[12.0, 32.0, 48.0, 96.0]])
TEMPORAL = dict(id="t1", task="temporal", media_type="video", media_path="v.mp4", query="blue square",
                image_size=[56, 56], duration_seconds=8.0, spans_seconds=[[2.0, 5.0], [6.0, 8.0]],
                saliency_clip_ids=[1, 2], saliency_scores=[[4, 4, 3], [2, 2, 2]])
TEXT = dict(id="c1", task="text", media_type="image", media_path="x.png", image_size=[64, 64],
            conversations=[{"role": "user", "content": "<image>\nWhat colour is it?"},
                           {"role": "assistant", "content": "red"},
                           {"role": "user", "content": "And its shape?"},
                           {"role": "assistant", "content": "a circle"}])


def _decode(tokenizer, ids, keep):
    return tokenizer.decode([i for i, k in zip(ids, keep) if k])


def test_helpers_hand_computed():
    assert uniform_timestamps(8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    # frames at 1, 3, 5, 7 s with 2 s clips: clip 1 -> mean(4, 4, 3) / 4, clip 2 -> 0.5
    assert frame_saliency([1.0, 3.0, 5.0, 7.0], 2.0, [1, 2], [[4, 4, 3], [2, 2, 2]]) == [0.0, 11 / 12, 0.5, 0.0]
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    rle = encode_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [5, 7]
    assert np.array_equal(decode_rle(rle), mask)
    image = np.full((4, 6, 3), 255, np.uint8)
    values = sam2_pixel_values([image], 8)
    assert values.shape == (1, 3, 8, 8)
    torch.testing.assert_close(values[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_geometry_resize_and_centre_crop():
    resize = ImageGeometry(width=200, height=100, scale_x=1, scale_y=1, view_width=200, view_height=100)
    np.testing.assert_allclose(resize.normalise([[20, 10, 100, 50]]), [[0.1, 0.1, 0.5, 0.5]])

    class Clip:  # shortest edge 50, centre crop 50 x 50
        size = {"shortest_edge": 50}
        crop_size = {"height": 50, "width": 50}
        do_center_crop = True

    geometry = image_geometry(Clip(), height=100, width=200)  # resized to 100 x 50, crop x from 25 to 75
    np.testing.assert_allclose(geometry.normalise([[60, 0, 140, 100]]), [[0.1, 0.0, 0.9, 1.0]])
    np.testing.assert_allclose(geometry.normalise([[0, 0, 40, 50]]), [[0.0, 0.0, 0.0, 0.5]])  # clamped to the crop
    box = np.array([[0.2, 0.3, 0.6, 0.9]])
    np.testing.assert_allclose(geometry.normalise(geometry.denormalise(box)), box)


def _bright_box_in_pixels(pixel_values) -> np.ndarray:
    """(x0, y0, x1, y1) normalised bounds of the above-mid-grey pixels of a (3, H, W) processed image."""
    bright = np.asarray(pixel_values)[0] > 0.5
    ys, xs = np.nonzero(bright)
    height, width = bright.shape
    return np.array([xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height])


@pytest.mark.parametrize("settings, height, width", [
    ({"do_pad": True, "size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}}, 60, 120),  # LLaVA-1.5
    ({"do_pad": True, "size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}}, 120, 60),
    ({"do_pad": False, "size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}}, 60, 120),  # CLIP
    ({"do_pad": False, "do_center_crop": False, "size": {"height": 48, "width": 48}}, 60, 120),  # plain resize
])
def test_geometry_matches_the_real_image_processor(settings, height, width):
    """A white rectangle drawn at a known box lands, after the real LLaVA image processor (pad to square,
    resize, centre crop), where `image_geometry` says it does; and post-processing maps it back."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    processor = LlavaImageProcessorPil(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], **settings)
    box = np.array([[30.0, 12.0, 54.0, 48.0]]) if width > height else np.array([[12.0, 30.0, 48.0, 54.0]])
    image = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box[0].astype(int)
    image[y0:y1, x0:x1] = 255
    pixels = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    geometry = image_geometry(processor, height=height, width=width)
    measured = _bright_box_in_pixels(pixels)
    np.testing.assert_allclose(geometry.normalise(box)[0], measured, atol=2.5 / pixels.shape[-1])
    np.testing.assert_allclose(geometry.denormalise(geometry.normalise(box)), box, atol=1e-6)


def test_view_to_sam2_undoes_llava_padding_hand_computed(llava):
    """60 x 120 image, pad to 120 x 120 (30 rows above), resize to 48: y_view = (y + 30) / 120, so the whole
    image's y / 60 = 2 y_view - 0.5; x is unchanged. A centre crop of 40 adds its offset of 4 px (of 48)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    _, processor = llava
    settings = {"do_pad": True, "size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}}
    padded = copy.copy(processor)
    padded.image_processor = LlavaImageProcessorPil(**settings)
    np.testing.assert_allclose(padded.view_to_sam2(60, 120), [1.0, 0.0, 2.0, -0.5])
    cropped = copy.copy(processor)
    cropped.image_processor = LlavaImageProcessorPil(**{**settings, "crop_size": {"height": 40, "width": 40}})
    # view = 40 px of the 48 px resize, offset 4 px: x / 120 = (40 x_view + 4) / 48
    np.testing.assert_allclose(cropped.view_to_sam2(60, 120), [40 / 48, 4 / 48, 2 * 40 / 48, 2 * 4 / 48 - 0.5])


def test_region_sample_labels_targets_and_query(llava):
    model, processor = llava
    tokenizer = processor.tokenizer
    encoded = processor.encode(REGION)
    assert _decode(tokenizer, encoded.input_ids, [l != -100 for l in encoded.labels]) == "<box_begin><boxes><|end|>"
    assert all(l in (-100, i) for l, i in zip(encoded.labels, encoded.input_ids))
    first_label = next(i for i, l in enumerate(encoded.labels) if l != -100)
    assert encoded.instruction_end_index == first_label - 1
    assert encoded.input_ids[encoded.instruction_end_index] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    question = _decode(tokenizer, encoded.input_ids, encoded.query_token_mask)
    assert "red circle" in question and "<" not in question
    assert encoded.task_label == 2
    assert encoded.input_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 16
    np.testing.assert_allclose(encoded.targets["region_boxes"], [[12 / 96, 32 / 128, 48 / 96, 96 / 128]])


def test_multi_turn_conversation_labels_every_answer(llava):
    _, processor = llava
    encoded = processor.encode(TEXT)
    answers = _decode(processor.tokenizer, encoded.input_ids, [l != -100 for l in encoded.labels])
    assert answers == "red<|end|>a circle<|end|>"
    assert encoded.task_label == 0 and encoded.targets == {}
    assert "And its shape?" in _decode(processor.tokenizer, encoded.input_ids, encoded.query_token_mask)


def test_temporal_sample_llava_frames(llava):
    _, processor = llava
    encoded = processor.encode(TEMPORAL)
    frame_index = np.array(encoded.frame_token_index)
    assert [int((frame_index == f).sum()) for f in range(4)] == [16, 16, 16, 16]
    assert encoded.media["timestamps"] == [1.0, 3.0, 5.0, 7.0]
    np.testing.assert_allclose(encoded.targets["temporal_spans"], [[0.25, 0.625], [0.75, 1.0]])
    np.testing.assert_allclose(encoded.targets["temporal_saliency"], [0.0, 11 / 12, 0.5, 0.0])


def test_temporal_sample_qwen_groups_frames(qwen):
    _, processor = qwen
    encoded = processor.encode(TEMPORAL)
    video = processor.tokenizer.convert_tokens_to_ids("<video>")
    assert encoded.input_ids.count(video) == 8  # 4 frames -> 2 temporal groups x (4 x 4 patches / 2 x 2 merge)
    frame_index = np.array(encoded.frame_token_index)
    assert [int((frame_index == g).sum()) for g in range(2)] == [4, 4]
    assert processor.head_frame_timestamps([1.0, 3.0, 5.0, 7.0]) == [2.0, 6.0]
    # saliency per head frame (2 s and 6 s): clip 1 -> 11/12, clip 3 -> 0
    np.testing.assert_allclose(encoded.targets["temporal_saliency"], [11 / 12, 0.0])
    types = np.array(encoded.mm_token_type_ids)
    assert (types == 2).sum() == 8 and set(types[np.array(encoded.input_ids) != video]) == {0}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_collated_mixed_batch_runs_through_the_model(family, llava, qwen):
    model, processor = llava if family == "llava" else qwen
    samples = [REGION, TEMPORAL, {**TEXT, "image_size": [56, 56]}]
    media = [{"image": np.zeros((128, 96, 3), np.uint8)},
             {"frames": np.zeros((4, 56, 56, 3), np.uint8), "timestamps": [1.0, 3.0, 5.0, 7.0]},
             {"image": np.zeros((56, 56, 3), np.uint8)}]
    batch = collate_encoded(processor, [processor.encode(s) for s in samples], media)
    assert batch["input_ids"].shape[0] == 3
    assert batch["task_labels"].tolist() == [2, 1, 0]
    assert batch["region_batch_index"].tolist() == [0]
    assert batch["temporal_span_query_index"].tolist() == [0, 0]
    expected_frames = 4 if family == "llava" else 2
    assert batch["frame_timestamps"].shape == (3, expected_frames)
    assert batch["frame_timestamps"][0].tolist() == [-1.0] * expected_frames
    out = model(**batch)
    assert torch.isfinite(out.loss) and {"lm", "assign", "region", "temporal"} <= set(out.loss_dict)
    torch.testing.assert_close(out.loss, weighted_loss(model, out))
    assert out.pred_boxes.shape == (1, 4)


def test_left_padding_moves_instruction_end(llava):
    _, processor = llava
    encoded = [processor.encode(REGION, mode="generate"), processor.encode(TEXT, mode="generate")]
    media = [{"image": np.zeros((128, 96, 3), np.uint8)}, {"image": np.zeros((64, 64, 3), np.uint8)}]
    batch = collate_encoded(processor, encoded, media, padding_side="left")
    assistant = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    ends = batch["instruction_end_index"]
    assert (batch["input_ids"][torch.arange(2), ends] == assistant).all()
    assert (batch["input_ids"][:, -1] == assistant).all()


def test_force_task_mode_appends_task_tokens(llava):
    _, processor = llava
    encoded = processor.encode(REGION, mode="force_task")
    tail = processor.tokenizer.convert_ids_to_tokens(encoded.input_ids[-3:])
    assert tail == ["<|assistant|>", "<box_begin>", "<boxes>"]
    assert encoded.instruction_end_index == len(encoded.input_ids) - 3
    assert all(l == -100 for l in encoded.labels)


def test_post_processing_inverts_the_targets(llava):
    _, processor = llava
    encoded = processor.encode(REGION)
    boxes = torch.tensor(encoded.targets["region_boxes"])
    pixels = processor.post_process_boxes(boxes, [(128, 96)])
    np.testing.assert_allclose(pixels, REGION["boxes_xyxy_pixels"], atol=1e-4)
    windows = processor.post_process_spans([[(0.25, 0.625, 0.9)]], [8.0])
    assert windows == [[[2.0, 5.0, 0.9]]]
    saliency = processor.post_process_saliency(torch.tensor([[0.1, 0.9, 0.5, 0.0]]), [[1.0, 3.0, 5.0, 7.0]], [8.0])
    assert saliency == [[pytest.approx(0.1), pytest.approx(0.9), pytest.approx(0.5), pytest.approx(0.0)]]
    logits = torch.full((1, 8, 8), -5.0)
    logits[0, 2:6, 0:4] = 5.0
    masks = processor.post_process_masks(logits, [(16, 16)])
    expected = np.zeros((16, 16), bool)
    expected[4:12, 0:8] = True
    assert np.array_equal(masks[0]["mask"], expected)
    assert np.array_equal(decode_rle(masks[0]["rle"]), expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "depth"}, "unknown task 'depth'"),
        ({"spans_seconds": [[6.0, 9.5]]}, r"span \[6.0, 9.5\] s is invalid for a video of 8.000 s"),
        ({"spans_seconds": [[5.0, 5.0]]}, "needs 0 <= start < end <= duration"),
        ({"duration_seconds": 0.0}, "duration_seconds"),
    ],
)
def test_bad_temporal_samples(llava, change, message):
    _, processor = llava
    with pytest.raises(ValueError, match=message):
        processor.encode({**TEMPORAL, **change})


def test_bad_mask_and_region_samples():
    _, processor = _build("llava", sam2_image_size=32)
    mask = encode_rle(np.ones((64, 64), bool))
    sample = dict(id="m1", task="mask", media_type="image", media_path="x.png", query="red circle",
                  image_size=[128, 96], masks_rle=[mask])
    with pytest.raises(ValueError, match=r"Sample 'm1': a mask of size \[64, 64\] does not match its frame \(128, 96\)"):
        processor.encode(sample)
    with pytest.raises(ValueError, match="needs exactly one box"):
        processor.encode({**REGION, "boxes_xyxy_pixels": []})
    no_sam2 = _build("llava")[1]
    with pytest.raises(ValueError, match="sam2_image_size"):
        no_sam2.encode({**sample, "masks_rle": [encode_rle(np.ones((128, 96), bool))]})


def test_processor_and_model_token_ids_must_agree(llava):
    model, processor = llava
    other, _ = _build("llava")
    config = other.config
    config.task_token_ids = {**config.task_token_ids, "region": {"begin": 1, "slots": [2]}}
    with pytest.raises(ValueError, match="differ from the model's"):
        processor.check_model_config(config)
    processor.check_model_config(model.config)


@pytest.mark.slow
def test_save_and_auto_processor_round_trip(tmp_path, llava):
    _, processor = llava
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.task_token_ids == processor.task_token_ids
    assert (loaded.layout, loaded.num_frames, loaded.image_seq_length) == ("llava", 4, 16)
    assert loaded.encode(REGION).input_ids == processor.encode(REGION).input_ids

    expected = processor.encode(TEMPORAL)
    script = textwrap.dedent(
        f"""
        import importlib.util
        from transformers import AutoProcessor
        assert importlib.util.find_spec("tpo") is None
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        encoded = processor.encode({TEMPORAL!r})
        assert encoded.input_ids == {expected.input_ids!r}
        assert encoded.labels == {expected.labels!r}
        assert encoded.targets == {expected.targets!r}
        print("PROCESSOR-OK")
        """
    )
    assert "PROCESSOR-OK" in run_clean_python(script, tmp_path / "env").stdout


def test_call_returns_a_batch_feature_in_the_requested_tensors(llava):
    from transformers import BatchFeature

    _, processor = llava
    media = [{"image": np.zeros((128, 96, 3), np.uint8)}, {"image": np.zeros((64, 64, 3), np.uint8)}]
    expected = collate_encoded(processor, [processor.encode(s, mode="generate") for s in (REGION, TEXT)], media,
                               padding_side="left")
    pt = processor([REGION, TEXT], media)
    assert isinstance(pt, BatchFeature) and set(pt) == set(expected)
    assert pt["tpo_meta"] == expected["tpo_meta"]
    for key, value in expected.items():
        if key != "tpo_meta":
            assert isinstance(pt[key], torch.Tensor) and torch.equal(pt[key], value), key
    np_batch = processor([REGION, TEXT], media, return_tensors="np")
    assert np_batch["tpo_meta"] == expected["tpo_meta"]
    for key, value in expected.items():
        if key != "tpo_meta":
            assert isinstance(np_batch[key], np.ndarray) and np.array_equal(np_batch[key], value.numpy()), key
