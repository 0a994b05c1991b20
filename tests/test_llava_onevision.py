"""LLaVA-OneVision through TPOProcessor and TPOForConditionalGeneration: any-resolution placeholder counts and
token positions against the model's own features, video tokens per frame, box convention, forward with both
heads, the heatmap region head, and generation."""

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_inputs import weighted_loss
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from tpo import TPOForConditionalGeneration
from tpo.processing.collator_tpo import collate_encoded
from tpo.processing.processing_tpo import TPOProcessor, image_geometry
from tpo.processing.schema import empty_sample
from tpo.tiny import (
    TINY_ONEVISION_PINPOINTS,
    build_tiny_tokenizer,
    random_media,
    tiny_llava_onevision_config,
)

TILE = 32  # tiny vision tower: 32 px tiles of 4 x 4 tokens (8 px patches)
SIDE = 4
NUM_FRAMES = 4
# (height, width) -> tile grid (rows x cols) of the tiny pinpoints
IMAGE_SIZES = {(40, 90): (1, 3), (90, 40): (3, 1), (50, 50): (2, 2), (30, 31): (1, 1), (64, 20): (2, 1),
               (60, 40): (2, 2)}


def _image_processor(**kwargs):
    return LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                           image_grid_pinpoints=TINY_ONEVISION_PINPOINTS, **kwargs)


def _build(vision_aspect_ratio="anyres_max_9", region_head_config=None):
    tokenizer = build_tiny_tokenizer()
    mllm = LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config(tokenizer,
                                                                              vision_aspect_ratio=vision_aspect_ratio))
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=["temporal", "region"], tokenizer=tokenizer,
                                                  region_head_config=region_head_config)
    processor = TPOProcessor.from_model_config(model.config, _image_processor(), tokenizer, num_frames=NUM_FRAMES)
    return model, processor


@pytest.fixture(scope="module")
def onevision():
    torch.manual_seed(0)
    return _build()


def _region(height, width, box=None):
    box = box or [0.2 * width, 0.25 * height, 0.7 * width, 0.9 * height]
    return empty_sample(id=f"r{height}x{width}", task="region", media_type="image",
                        media_path=f"img_{height}x{width}.png", query="red circle", image_size=[height, width],
                        boxes_xyxy_pixels=[box])


TEMPORAL = empty_sample(id="t1", task="temporal", media_type="video", media_path="v.mp4", query="blue square",
                        image_size=[40, 72], duration_seconds=8.0, spans_seconds=[[2.0, 5.0]])
TEXT = empty_sample(id="c1", task="text", media_type="image", media_path="c.png", image_size=[48, 40],
                    conversations=[{"role": "user", "content": "<image>\nWhat colour is it?"},
                                   {"role": "assistant", "content": "red"}])


def _batch(processor, samples, mode="train", media=None, padding_side="right"):
    encoded = [processor.encode(s, mode=mode) for s in samples]
    media = media or [random_media(e.media) for e in encoded]
    batch = collate_encoded(processor, encoded, media, padding_side=padding_side)
    batch.pop("tpo_meta")
    return encoded, batch


def _hf_number_of_features(processor, height, width) -> int:
    """transformers' own LlavaOnevisionProcessor count (without building it: it needs a video processor)."""
    hf = types.SimpleNamespace(image_processor=processor.image_processor, num_image_tokens=SIDE * SIDE,
                               vision_aspect_ratio=processor.vision_aspect_ratio)
    hf._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, hf)
    return LlavaOnevisionProcessor._get_number_of_features(hf, height, width, TILE, TILE)


# ------------------------------------------------------------------------------------------------
# Placeholder counts and token positions against the model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision_aspect_ratio", ["anyres_max_9", "anyres_max_1"])  # max_1 shrinks the tile grid
def test_image_placeholders_equal_the_models_features(vision_aspect_ratio):
    model, processor = _build(vision_aspect_ratio)
    image_id = processor.image_token_id
    samples = [_region(h, w) for h, w in IMAGE_SIZES]
    encoded, batch = _batch(processor, samples)
    # the tile grids differ: the processor cut rows * cols tiles (+ the base image) per image
    tiles = [int((batch["pixel_values"][i].flatten(1).abs().sum(-1) > 0).sum()) - 1 for i in range(len(samples))]
    assert tiles == [r * c for r, c in IMAGE_SIZES.values()]
    assert batch["image_sizes"].tolist() == [list(s) for s in IMAGE_SIZES]
    with torch.no_grad():
        features = model.mllm.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    counts = [e.input_ids.count(image_id) for e in encoded]
    assert counts == [f.shape[0] for f in features]
    assert counts == [_hf_number_of_features(processor, h, w) for h, w in IMAGE_SIZES]
    for e, (rows_tiles, cols_tiles) in zip(encoded, IMAGE_SIZES.values()):
        xy = np.array([p for p, t in zip(e.visual_token_xy, e.input_ids) if t == image_id])
        newline = xy[:, 0] < 0
        # base image: a 4 x 4 grid over the whole image first, then the tile rows, each ending with a newline
        np.testing.assert_allclose(xy[:16, 0], np.tile((np.arange(SIDE) + 0.5) / SIDE, SIDE))
        np.testing.assert_allclose(xy[:16, 1], np.repeat((np.arange(SIDE) + 0.5) / SIDE, SIDE))
        assert not newline[:16].any() and newline[-1]
        rows = int(newline.sum())
        cols = (len(xy) - 16) // rows - 1
        rows_newline = newline[16:].reshape(rows, cols + 1)
        assert rows_newline[:, -1].all() and not rows_newline[:, :-1].any()
        if vision_aspect_ratio == "anyres_max_9":  # no shrink: at most the canvas' rows/columns of tokens
            assert rows <= rows_tiles * SIDE and cols <= cols_tiles * SIDE
        grid = xy[16:].reshape(rows, cols + 1, 2)[:, :-1]
        assert (np.diff(grid[..., 0], axis=1) > 0).all() and (np.diff(grid[..., 1], axis=0) > 0).all()
        assert grid.min() >= 0 and grid.max() <= 1
        assert e.frame_token_index == [-1] * len(e.input_ids)
    out = model(**batch)  # no placeholder / feature mismatch
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, weighted_loss(model, out))


class BrightnessProbe(torch.nn.Module):
    """Stands in for the vision tower: each patch token is the mean of channel 0 over its patch, on every
    one of `dim` channels; with an identity projector each image token then carries the brightness it sees."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch, self.dim = patch, dim

    def forward(self, pixel_values, **kwargs):
        tokens = F.avg_pool2d(pixel_values[:, :1], self.patch).flatten(2).transpose(1, 2).expand(-1, -1, self.dim)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, hidden_states=(tokens,))


def _probe(vision_aspect_ratio):
    """A tiny OneVision whose image tokens carry the brightness of what they see (newline tokens: -5), with a
    processor that does not normalise (dark 0, bright 1)."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_onevision_config(tokenizer, vision_aspect_ratio=vision_aspect_ratio)
    mllm = LlavaOnevisionForConditionalGeneration(config)
    mllm.model.vision_tower = BrightnessProbe(config.vision_config.patch_size, config.text_config.hidden_size)
    mllm.model.multi_modal_projector = torch.nn.Identity()
    mllm.model.image_newline.data.fill_(-5.0)
    processor = TPOProcessor(image_processor=_image_processor(image_mean=[0, 0, 0], image_std=[1, 1, 1]),
                             tokenizer=tokenizer, layout="llava_onevision", image_seq_length=SIDE * SIDE,
                             vision_aspect_ratio=vision_aspect_ratio, num_frames=NUM_FRAMES)
    return mllm, processor


def _seen_fraction(xy: torch.Tensor, spacing: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(n,) fraction of each token's footprint (its centre +- spacing / 2, normalised) inside the box."""
    low, high = xy - spacing / 2, xy + spacing / 2
    overlap = (torch.minimum(high, box[2:]) - torch.maximum(low, box[:2])).clamp(min=0)
    return overlap.prod(-1) / spacing.prod()


def _spacing(coordinates: torch.Tensor) -> float:
    """Distance between neighbouring token centres along one axis (1 for a single centre)."""
    distinct = torch.unique(coordinates)
    return float(torch.diff(distinct).median()) if len(distinct) > 1 else 1.0


@pytest.mark.parametrize("vision_aspect_ratio", ["anyres_max_9", "anyres_max_1"])
def test_each_token_sees_what_visual_token_xy_says(vision_aspect_ratio):
    """A bright box in a dark image: each image token's brightness in the model's own features is the fraction of
    its footprint around `visual_token_xy` (in the original image's normalised frame, the boxes' convention) that
    lies in the box; the newline tokens are exactly those with xy = -1. Mirrored positions fail the same check."""
    mllm, processor = _probe(vision_aspect_ratio)
    for height, width in IMAGE_SIZES:
        box_pixels = [0.3 * width, 0.35 * height, 0.85 * width, 0.9 * height]
        image = np.zeros((height, width, 3), np.uint8)
        x0, y0, x1, y1 = (int(round(v)) for v in box_pixels)
        image[y0:y1, x0:x1] = 255
        encoded, batch = _batch(processor, [_region(height, width, box=box_pixels)], media=[{"image": image}])
        with torch.no_grad():
            values = mllm.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output[0][:, 0]
        xy = torch.tensor([p for p, t in zip(encoded[0].visual_token_xy, encoded[0].input_ids)
                           if t == processor.image_token_id])
        assert values.shape[0] == xy.shape[0]
        newline = xy[:, 0] < 0
        assert torch.equal(values == -5.0, newline)
        box = torch.tensor(encoded[0].targets["region_boxes"][0])  # normalised like the tokens
        np.testing.assert_allclose(box, [x0 / width, y0 / height, x1 / width, y1 / height],
                                   atol=0.5 / min(height, width))
        for group in (slice(0, SIDE * SIDE), slice(SIDE * SIDE, None)):  # base image, tile grid
            g_xy, g_values = xy[group][~newline[group]], values[group][~newline[group]]
            spacing = torch.tensor([_spacing(g_xy[:, 0]), _spacing(g_xy[:, 1])])
            expected = _seen_fraction(g_xy, spacing, box)
            assert expected.max() >= 0.7 and expected.min() == 0, (height, width, group)  # not vacuous
            error = (g_values - expected).abs()
            assert error.mean() < 0.05 and error.max() < 0.15, (height, width, group, error)
            mirrored = _seen_fraction(torch.stack([1 - g_xy[:, 0], 1 - g_xy[:, 1]], -1), spacing, box)
            assert (g_values - mirrored).abs().mean() > 0.25  # the check tells wrong positions apart


def test_video_tokens_per_frame_and_pixels():
    """4 frames -> 4 x (4 x 4 tokens pooled to 2 x 2) + 1 newline `<video>` tokens, frame by frame as the
    model's own `get_video_features` orders them (each uniform frame's brightness shows in its tokens)."""
    mllm, processor = _probe("anyres_max_9")
    encoded, batch = _batch(processor, [TEMPORAL], media=[{
        "frames": np.stack([np.full((40, 72, 3), 60 * (f + 1), np.uint8) for f in range(NUM_FRAMES)]),
        "timestamps": [1.0, 3.0, 5.0, 7.0]}])
    e = encoded[0]
    video = np.array(e.input_ids) == processor.video_token_id
    frames = np.array(e.frame_token_index)
    assert video.sum() == NUM_FRAMES * 4 + 1
    assert frames[video].tolist() == [f for f in range(NUM_FRAMES) for _ in range(4)] + [-1]
    assert (frames[~video] == -1).all()
    xy = np.array(e.visual_token_xy)[video]
    np.testing.assert_allclose(xy[:4], [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    assert xy[-1].tolist() == [-1.0, -1.0]
    assert batch["pixel_values_videos"].shape == (1, NUM_FRAMES, 3, TILE, TILE)
    assert batch["frame_timestamps"].tolist() == [[1.0, 3.0, 5.0, 7.0]]
    assert "pixel_values" not in batch and "mm_token_type_ids" not in batch
    with torch.no_grad():
        features = mllm.model.get_video_features(batch["pixel_values_videos"]).pooler_output[0][:, 0]
    assert features.shape[0] == video.sum()
    expected = [60 * (f + 1) / 255 for f in frames[video][:-1]] + [-5.0]
    torch.testing.assert_close(features, torch.tensor(expected, dtype=features.dtype), atol=1e-5, rtol=0)


def test_video_frames_are_the_image_processors_base_image(onevision):
    _, processor = onevision
    frames = np.random.default_rng(0).integers(0, 255, (NUM_FRAMES, 40, 72, 3), dtype=np.uint8)
    videos = processor.pixel_inputs([("video", frames)])["pixel_values_videos"]
    base = processor.image_processor(images=list(frames), return_tensors="pt")["pixel_values"][:, 0]
    torch.testing.assert_close(videos[0], base)
    with pytest.raises(ValueError, match=r"videos of this batch have \[3, 4\] frames"):
        processor.pixel_inputs([("video", frames), ("video", frames[:3])])


# ------------------------------------------------------------------------------------------------
# Box convention
# ------------------------------------------------------------------------------------------------
def test_box_normalisation_and_post_processing_round_trip(onevision):
    _, processor = onevision
    for height, width in [*IMAGE_SIZES, (300, 700)]:
        box = [0.1 * width, 0.2 * height, 0.65 * width, height]
        target = processor.encode(_region(height, width, box=box)).targets["region_boxes"]
        np.testing.assert_allclose(target, [[0.1, 0.2, 0.65, 1.0]], atol=1e-9)
        back = processor.post_process_boxes(torch.tensor(target), [(height, width)])
        np.testing.assert_allclose(back, [box], atol=1e-3)
        assert processor.view_to_sam2(height, width) == [1.0, 0.0, 1.0, 0.0]  # SAM2 sees the whole image too
        # the generic geometry of the image processor agrees (its do_pad pads tiles, not the image to a square)
        generic = image_geometry(processor.image_processor, height, width)
        np.testing.assert_allclose(generic.normalise([box]), target, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Model: forward with targets, heatmap head, generation
# ------------------------------------------------------------------------------------------------
def test_forward_with_targets_reaches_both_heads(onevision):
    model, processor = onevision
    samples = [_region(40, 90), TEMPORAL, _region(90, 40), TEXT]
    _, batch = _batch(processor, samples)
    assert batch["pixel_values"].shape[:2] == (3, 5) and batch["image_sizes"].tolist() == [[40, 90], [90, 40], [48, 40]]
    assert batch["pixel_values_videos"].shape == (1, NUM_FRAMES, 3, TILE, TILE)
    assert batch["task_labels"].tolist() == [2, 1, 2, 0] and batch["region_batch_index"].tolist() == [0, 2]
    model.zero_grad()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, weighted_loss(model, out))
    assert out.pred_boxes.shape == (2, 4)
    for name in ("lm_loss", "assign_loss", "region_loss", "temporal_loss"):
        assert torch.isfinite(getattr(out, name)) and getattr(out, name) > 0, name
    out.loss.backward()
    for head in (model.region_head, model.temporal_head):
        grads = [p.grad for p in head.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(model.mllm.model.image_newline.grad.abs().sum()) > 0  # newline tokens are in the sequence
    model.zero_grad()


def test_heatmap_region_head_reads_the_onevision_tokens():
    model, processor = _build(region_head_config={"mode": "heatmap", "heatmap_dim": 16})
    assert model.region_head.mode == "heatmap"
    samples = [_region(40, 90), _region(50, 50)]
    encoded, batch = _batch(processor, samples)
    out = model(**batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.loss_dict["region_heatmap"])
    assert out.loss_dict["region_heatmap"] >= 0  # a KL divergence
    torch.testing.assert_close(out.loss, weighted_loss(model, out))
    out.loss.backward()
    assert all(p.grad is not None for p in model.region_head.parameters())
    # the boxes are the head's over exactly the tokens with a position: the image tokens, newlines excluded
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
        hidden = model.mllm.base_model(**inputs).last_hidden_state
        slot = model.config.task_token_ids["region"]["slots"][0]
        rows, positions = (batch["input_ids"] == slot).nonzero(as_tuple=True)
        expected = []
        for row, position, e in zip(rows, positions, encoded):
            keep = torch.tensor([x >= 0 for x, _ in e.visual_token_xy])  # image tokens but the row newlines
            image_tokens = torch.tensor(e.input_ids) == processor.image_token_id
            assert bool((keep <= image_tokens).all()) and 0 < int(image_tokens.sum() - keep.sum()) < 16
            xy = torch.tensor(e.visual_token_xy)[keep][None]
            boxes, _ = model.region_head.forward_with_heatmap(hidden[row, position][None, None],
                                                              hidden[row, : len(e.input_ids)][keep][None], xy)
            expected.append(boxes[0])
        cxcywh = torch.stack(expected)
        xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], -1).clamp(0, 1)
    torch.testing.assert_close(out.pred_boxes.detach(), xyxy, atol=1e-5, rtol=1e-5)


def test_generate_force_task_region_returns_the_forward_box(onevision):
    model, processor = onevision
    sample = _region(40, 90)
    _, batch = _batch(processor, [sample], mode="generate", padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, force_task="region", max_new_tokens=2, do_sample=False)
        _, forced = _batch(processor, [sample], mode="force_task", padding_side="left")
        reference = model(**{k: v for k, v in forced.items() if k not in ("labels", "task_labels", "region_boxes",
                                                                           "region_batch_index")})
    boxes = out.task_outputs[0]["region"]["boxes"]
    torch.testing.assert_close(boxes, reference.pred_boxes)
    pixels = processor.post_process_boxes(boxes, [(40, 90)])[0]
    assert 0 <= pixels[0] <= pixels[2] <= 90 and 0 <= pixels[1] <= pixels[3] <= 40
    np.testing.assert_allclose(pixels, (boxes[0].numpy() * [90, 40, 90, 40]), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
def test_from_model_config_settings_checks_and_save_load(tmp_path, onevision):
    model, processor = onevision
    assert (processor.layout, processor.image_seq_length, processor.vision_aspect_ratio) == (
        "llava_onevision", 16, "anyres_max_9")
    assert not processor.uses_mm_token_type_ids
    tokenizer = processor.tokenizer
    with pytest.raises(ValueError, match="cuts 64 px tiles but the vision tower takes 32 px"):
        TPOProcessor.from_model_config(model.config, LlavaOnevisionImageProcessorPil(
            size={"height": 64, "width": 64}, image_grid_pinpoints=TINY_ONEVISION_PINPOINTS), tokenizer)
    with pytest.raises(ValueError, match="image_grid_pinpoints .* differ from the model's"):
        TPOProcessor.from_model_config(model.config, LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32], [64, 64]]), tokenizer)
    with pytest.raises(ValueError, match="needs `image_seq_length`"):
        TPOProcessor(image_processor=_image_processor(), tokenizer=tokenizer, layout="llava_onevision")
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert (loaded.layout, loaded.image_seq_length, loaded.vision_aspect_ratio) == ("llava_onevision", 16,
                                                                                     "anyres_max_9")
    sample = _region(90, 40)
    assert loaded.encode(sample).visual_token_xy == processor.encode(sample).visual_token_xy
