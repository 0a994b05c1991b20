"""Dense temporal features: per-clip features from the MLLM's own vision tower (frozen) at a configurable rate
while the LLM sees its N frames; the processor and collator plan and decode the clips (PyAV seek sampling),
saliency comes per clip on the official clip grid; the head finds a target the LLM's frames never show."""


import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny_inputs import weighted_loss
from transformers import LlavaForConditionalGeneration
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from script_loader import load_script
from tpo import TPOForConditionalGeneration
from tpo.modeling_tpo import features
from tpo.modeling_tpo.features import nearest_frame_index, vision_clip_features
from tpo.processing.collator_tpo import collate_encoded
from tpo.processing.data_collator import TPODataCollator
from tpo.processing.pipeline import encode_dataset, load_media
from tpo.processing.processing_tpo import TPOProcessor, dense_clip_timestamps
from tpo.processing.synthetic import IMAGE_SIZE as VIDEO_SIZE
from tpo.processing.synthetic import _write_video as write_synthetic_video
from tpo.training.metrics.temporal import temporal_iou
from tpo.tiny import build_tiny_tokenizer, random_media, tiny_llava_config, tiny_llava_onevision_config

SIZE = 32
HEAD = {"d_model": 64, "num_heads": 4, "dim_feedforward": 128, "num_encoder_layers": 1, "dropout": 0.0,
        "decoder": "dense"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def build(tokenizer, clip_seconds: float, num_frames: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    mllm = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=["temporal"], tokenizer=tokenizer,
                                                  temporal_head_config={**HEAD, "dense_clip_seconds": clip_seconds})
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                                               tokenizer, num_frames=num_frames)
    return model, processor


def temporal_row(index: int, path: str, duration: float, spans, **extra) -> dict:
    return dict(id=f"v{index}", source="test", split="train", media_path=path, query="red square",
                image_size=[SIZE, SIZE], conversations=[], boxes_xyxy_pixels=[], spans_seconds=spans,
                duration_seconds=duration, media_type="video", task="temporal", saliency_clip_ids=[],
                saliency_scores=[], **extra)


# ------------------------------------------------------------------------------------------------------------
# Planning: the clip grid, saliency per clip, bad settings
# ------------------------------------------------------------------------------------------------------------
def test_clip_grid_is_the_official_qvhighlights_grid():
    grid = dense_clip_timestamps(150.0, 2.0, 256)
    assert len(grid) == 75 and grid[:2] == [1.0, 3.0] and grid[-1] == 149.0  # 2-second clips, their centres
    assert dense_clip_timestamps(31.0, 2.0, 256)[-1] == 31.0  # 16 clips, the last centre clamped to the duration
    long = dense_clip_timestamps(600.0, 2.0, 100)  # capped: 100 clips of 6 s
    assert len(long) == 100 and long[:2] == [3.0, 9.0]


def test_processor_plans_clips_and_per_clip_saliency(tokenizer):
    _, processor = build(tokenizer, 2.0)
    row = temporal_row(0, "v.mp4", 10.0, [[2.0, 6.0]], fps=25.0)
    row.update(saliency_clip_ids=[1, 2], saliency_scores=[[2, 3, 4], [4, 4, 4]])
    encoded = processor.encode(row)
    assert encoded.media["timestamps"] == [1.25, 3.75, 6.25, 8.75]  # the LLM still sees its 4 frames
    assert encoded.media["dense_timestamps"] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert encoded.targets["temporal_saliency"] == [0.0, 0.75, 1.0, 0.0, 0.0]  # per clip: mean score / 4
    assert max(encoded.frame_token_index) == 3  # 4 LLM frames of visual tokens, no clip in the sequence
    text = processor.encode({**row, "task": "text", "conversations": [{"role": "user", "content": "<video>hi"},
                                                                      {"role": "assistant", "content": "ok"}]})
    assert "dense_timestamps" not in text.media  # only temporal samples take dense clips


def test_a_rate_asking_for_more_clips_than_frames_is_refused_naming_the_setting(tokenizer, tmp_path):
    _, processor = build(tokenizer, 0.5)
    frames = [str(tmp_path / f"{i:05d}.jpg") for i in range(6)]  # a 6-frame folder at 1 fps: 6 s, 12 clips asked
    row = temporal_row(0, "", 6.0, [[1.0, 3.0]], fps=1.0)
    row.update(media_type="frames", frame_paths=frames)
    with pytest.raises(ValueError, match=r"`dense_clip_seconds`=0.5 asks for 12 clips of its 6.00 s video, which has "
                                         r"only 6 frames"):
        processor.encode(row)
    path = tmp_path / "short.mp4"
    write_synthetic_video(path, [np.zeros((VIDEO_SIZE, VIDEO_SIZE, 3), np.uint8)] * 8, 2)  # 4 s, 8 frames; 16 clips
    plan = {"kind": "video", "source": "video", "path": str(path), "timestamps": [1.0, 3.0], "duration": 4.0,
            "dense_timestamps": dense_clip_timestamps(4.0, 0.25, 256), "dense_clip_seconds": 0.25}
    with pytest.raises(ValueError, match=r"`dense_clip_seconds`=0.25 asks for 16 clips .* only 8 frames"):
        load_media(plan)


def test_a_layout_without_per_frame_image_features_is_refused_naming_the_setting(tokenizer):
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    config = tiny_llava_onevision_config(tokenizer)
    model = TPOForConditionalGeneration.from_mllm(LlavaOnevisionForConditionalGeneration(config), tasks=["temporal"],
                                                  tokenizer=tokenizer, temporal_head_config={"dense_clip_seconds": 2.0})
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=config.image_grid_pinpoints)
    with pytest.raises(ValueError, match=r"`dense_clip_seconds`=2.0: dense temporal features are not available for "
                                         r"the 'llava_onevision' layout"):
        TPOProcessor.from_model_config(model.config, image_processor, tokenizer)


def test_a_vision_tower_without_per_frame_features_is_refused_naming_the_setting():
    class NoImageFeatures(torch.nn.Module):
        base_model = torch.nn.Identity()

    with pytest.raises(ValueError, match=r"temporal_head_config\['dense_clip_seconds'\] > 0 needs per-frame features"):
        vision_clip_features(NoImageFeatures(), {"dense_pixel_values": torch.zeros(2, 3, SIZE, SIZE)})


# ------------------------------------------------------------------------------------------------------------
# Model side: frozen vision-tower features per clip, nearest LLM frame, per-clip saliency
# ------------------------------------------------------------------------------------------------------------
def test_clip_features_are_the_frozen_towers_pooled_tokens_in_chunks(tokenizer, monkeypatch):
    model, _ = build(tokenizer, 2.0)
    pixels = torch.randn(5, 3, SIZE, SIZE)
    clips = vision_clip_features(model.mllm, {"dense_pixel_values": pixels}, pooling="mean_max")
    tokens = torch.stack(list(model.mllm.model.get_image_features(pixel_values=pixels).pooler_output))  # (5, 16, H)
    torch.testing.assert_close(clips, torch.cat([tokens.mean(1), tokens.amax(1)], -1))
    assert not clips.requires_grad  # frozen: no graph back into the vision tower
    monkeypatch.setattr(features, "DENSE_CHUNK_IMAGES", 2)  # 3 chunks of at most 2 clips: same features
    torch.testing.assert_close(vision_clip_features(model.mllm, {"dense_pixel_values": pixels}, "mean_max"), clips)


def test_nearest_llm_frame_of_each_clip_hand_computed():
    clips = torch.tensor([[0.05, 0.3, 0.55, 0.95]])
    frames = torch.tensor([[0.125, 0.375, 0.625, 0.875]])
    assert nearest_frame_index(clips, frames, torch.ones(1, 4, dtype=torch.bool)).tolist() == [[0, 1, 2, 3]]
    masked = torch.tensor([[True, True, False, False]])  # padded frames are never chosen
    assert nearest_frame_index(clips, frames, masked).tolist() == [[0, 1, 1, 1]]


def test_collated_dense_batch_gives_per_clip_outputs_and_trains(tokenizer):
    model, processor = build(tokenizer, 2.0)
    rows = [temporal_row(i, f"v{i}.mp4", 10.0 + 4 * i, [[2.0, 6.0]]) for i in range(2)]
    dataset = encode_dataset(Dataset.from_list(rows), processor, load_from_cache_file=False)
    batch = TPODataCollator(processor, media_loader=lambda plan, targets: random_media(plan))(list(dataset))
    assert batch["frame_timestamps"].shape == (2, 4) and batch["dense_pixel_values"].shape == (5 + 7, 3, SIZE, SIZE)
    assert batch["dense_clip_timestamps"][0].tolist() == [1.0, 3.0, 5.0, 7.0, 9.0, -1.0, -1.0]
    assert batch["tpo_meta"]["head_frame_timestamps"][1] == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0]
    meta = batch.pop("tpo_meta")
    out = model(**batch)
    temporal = out.temporal_outputs
    assert temporal["pred_saliency"].shape == (2, 7) and temporal["frame_mask"].sum(-1).tolist() == [5, 7]
    torch.testing.assert_close(temporal["frame_times"][0, :5], torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))
    out.loss.backward()
    assert model.temporal_head.clip_proj[1].weight.grad.abs().sum() > 0
    # QVHighlights predictions: per-clip saliency maps onto the 2-second grid one to one
    scores = processor.post_process_saliency(temporal["pred_saliency"][1:, :7], [meta["head_frame_timestamps"][1]],
                                             [24.0])[0]
    assert scores == pytest.approx(temporal["pred_saliency"][1, :7].tolist() + [temporal["pred_saliency"][1, 6].item()] * 5)
    with pytest.raises(ValueError, match=r"dense_clip_seconds'\] > 0 but the batch has no dense clips"):
        model(**{k: v for k, v in batch.items() if not k.startswith("dense_")})


def test_qwen2_vl_clips_go_through_its_image_path_with_their_grids(tokenizer):
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tpo.tiny import tiny_qwen2_vl_config

    torch.manual_seed(0)
    model = TPOForConditionalGeneration.from_mllm(
        Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config(tokenizer)), tasks=["temporal"], tokenizer=tokenizer,
        temporal_head_config={**HEAD, "dense_clip_seconds": 2.0})
    processor = TPOProcessor.from_model_config(model.config, Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2), tokenizer, num_frames=4)
    rows = [{**temporal_row(i, f"q{i}.mp4", 6.0 + 2 * i, [[1.0, 3.0]]), "image_size": [56, 56]} for i in range(2)]
    encoded = [processor.encode(row) for row in rows]
    batch = collate_encoded(processor, encoded, [random_media(e.media) for e in encoded])
    batch.pop("tpo_meta")
    assert batch["dense_image_grid_thw"].tolist() == [[1, 4, 4]] * 7  # 3 + 4 clips, each one 56 px image
    clips = vision_clip_features(model.mllm, {k: v for k, v in batch.items() if k.startswith("dense_pixel")
                                               or k == "dense_image_grid_thw"}, "mean_max")
    assert clips.shape == (7, 2 * model.config.get_text_config().hidden_size)
    out = model(**batch)
    assert out.temporal_outputs["frame_mask"].sum(-1).tolist() == [3, 4] and torch.isfinite(out.loss)
    assert "temporal" in out.loss_dict
    torch.testing.assert_close(out.loss, weighted_loss(model, out))


def test_generate_runs_the_dense_head_on_forced_temporal_queries(tokenizer):
    model, processor = build(tokenizer, 2.0)
    encoded = [processor.encode(temporal_row(i, f"g{i}.mp4", 8.0, [[2.0, 4.0]]), mode="force_task") for i in range(2)]
    media = [random_media(e.media) for e in encoded]
    batch = collate_encoded(processor, encoded, media, padding_side="left")
    batch.pop("tpo_meta")
    generated = model.eval().generate(**batch, max_new_tokens=2, do_sample=False)
    for entry in generated.task_outputs:
        assert len(entry["temporal"]["saliency"][0]) == 4  # one score per 2-second clip of the 8 s video


# ------------------------------------------------------------------------------------------------------------
# The point of it: a target visible only between two of the LLM's frames
# ------------------------------------------------------------------------------------------------------------
DURATION, FPS = 16.0, 4  # the LLM's 4 frames are at 2, 6, 10 and 14 s


def between_frames_video(path, rng, gap: int) -> list[float]:
    """A 16 s video (the synthetic benchmark's 128 px frames) with a red square during ~2.5 s between two LLM frames
    (gap 0, 1 or 2: around 4, 8 or 12 s), never at an LLM frame's time. Returns the window in seconds."""
    centre = 4.0 * (gap + 1) + rng.uniform(-0.25, 0.25)
    start, end = centre - 1.25, centre + 1.25
    background = rng.integers(0, 120, (VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8)
    y, x = rng.integers(8, VIDEO_SIZE - 56, 2)
    frames = []
    for index in range(int(DURATION * FPS)):
        frame = background.copy()
        if start <= (index + 0.5) / FPS <= end:
            frame[y:y + 48, x:x + 48] = (230, 20, 20)
        frames.append(frame)
    write_synthetic_video(path, frames, FPS)
    return [start, end]


@pytest.fixture(scope="module")
def between_frames_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("between")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(36):  # 24 to train, 12 to test (4 per gap)
        path = folder / f"v{index}.mp4"
        window = between_frames_video(path, rng, index % 3)
        rows.append({**temporal_row(index, str(path), DURATION, [window]), "image_size": [VIDEO_SIZE, VIDEO_SIZE]})
    return rows[:24], rows[24:]


def train_and_score(tokenizer, clip_seconds: float, train_rows, test_rows, steps: int = 60) -> float:
    """R1@0.5 on the test rows after training the temporal head alone (the MLLM frozen: its hidden states are
    computed once per batch and reused)."""
    model, processor = build(tokenizer, clip_seconds)
    collator = TPODataCollator(processor)  # real decoding: PyAV seek sampling of frames and clips

    def batches(rows, size):
        encoded = encode_dataset(Dataset.from_list(rows), processor, load_from_cache_file=False)
        out = []
        for first in range(0, len(encoded), size):
            batch = collator([encoded[i] for i in range(first, min(first + size, len(encoded)))])
            meta = batch.pop("tpo_meta")
            with torch.no_grad():
                batch["backbone_hidden_states"] = model.mllm.base_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch.pop("pixel_values")).last_hidden_state
            out.append((batch, meta))
        return out

    train, test = batches(train_rows, 8), batches(test_rows, 12)
    optimiser = torch.optim.AdamW(model.temporal_head.parameters(), lr=3e-3)
    model.train()
    with model.loss_weights_as({"lm": 0.0, "assign": 0.0, "temporal": 1.0}):
        for step in range(steps):
            batch, _ = train[step % len(train)]
            optimiser.zero_grad()
            model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1).loss.backward()
            optimiser.step()
    model.eval()
    hits = []
    with torch.no_grad():
        for batch, _ in test:
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "temporal_spans", "temporal_span_query_index",
                                                                  "temporal_saliency", "task_labels")}
            out = model(**inputs, logits_to_keep=1)
            windows = model.temporal_head.predict_windows(out.temporal_outputs, top_k=1)
            spans = batch["temporal_spans"].tolist()
            hits += (temporal_iou([w[0][:2] for w in windows], spans) >= 0.5).tolist()
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_dense_clips_find_a_target_the_llm_frames_never_show(tokenizer, between_frames_data):
    train_rows, test_rows = between_frames_data
    with_clips = train_and_score(tokenizer, 1.0, train_rows, test_rows)
    without = train_and_score(tokenizer, 0.0, train_rows, test_rows)
    assert with_clips >= 0.5, with_clips
    assert without < 0.5, without


def test_dense_benchmark_runs():
    bench = load_script("benchmarks/bench_dense_temporal.py")
    plain = bench.measure_step("micro", 0.0, batch_size=1, steps=1, warmup=0)
    dense = bench.measure_step("micro", 2.0, batch_size=1, steps=1, warmup=0)
    assert dense["clips"] == 75 and plain["clips"] == 0
    assert dense["saved_bytes_per_sample"] > plain["saved_bytes_per_sample"] > 0 and dense["seconds_per_sample"] > 0
