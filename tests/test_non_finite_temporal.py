"""Non-finite values on the DETR temporal decoder's path end in the trainer's NonFiniteLossError (step, term,
sample ids), not in scipy's "matrix contains invalid numeric entries" inside the Hungarian matcher."""

import pytest
import torch
from datasets import Dataset
from transformers import LlavaForConditionalGeneration
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tpo import TPOForConditionalGeneration
from tpo.modeling_tpo.matcher import SpanHungarianMatcher
from tpo.processing.data_collator import TPODataCollator
from tpo.processing.pipeline import encode_dataset
from tpo.processing.processing_tpo import TPOProcessor
from tpo.training.arguments import TPOTrainingArguments
from tpo.tiny import build_tiny_tokenizer, random_media, tiny_llava_config
from tpo.training.trainer import NonFiniteLossError, TPOTrainer


def temporal_samples(n: int = 2) -> list[dict]:
    return [dict(id=f"t{i}", source="test", split="train", media_path=f"vid{i}.mp4", query="red circle",
                 image_size=[32, 32], conversations=[], boxes_xyxy_pixels=[], spans_seconds=[[2.0, 6.0]],
                 duration_seconds=8.0, media_type="video", task="temporal", saliency_clip_ids=[], saliency_scores=[])
            for i in range(n)]


@pytest.fixture(scope="module")
def trainer_and_batch(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(tiny_llava_config(tokenizer)),
                                                  tasks=["temporal"], tokenizer=tokenizer,
                                                  temporal_head_config={"decoder": "detr"})
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=4)
    dataset = encode_dataset(Dataset.from_list(temporal_samples()), processor)
    collator = TPODataCollator(processor, media_loader=lambda plan, targets: random_media(plan))
    args = TPOTrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), stage="joint", report_to=[],
                                use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = TPOTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    return trainer, collator([dataset[i] for i in range(len(dataset))])


def _expect_non_finite_error(trainer, batch):
    with pytest.raises(NonFiniteLossError, match=r"step 0: term\(s\) \[.*'temporal'.*on samples \['t0', 't1'\]"):
        trainer.compute_loss(trainer.model, dict(batch))


def test_nan_activations_in_the_detr_decoder_end_in_the_trainers_error(trainer_and_batch):
    trainer, batch = trainer_and_batch
    head = trainer.model.temporal_head
    saved = head.class_head.bias.detach().clone()
    with torch.no_grad():
        head.class_head.bias.fill_(float("nan"))  # NaN foreground logits reach the matcher's class cost
    try:
        _expect_non_finite_error(trainer, batch)
    finally:
        with torch.no_grad():
            head.class_head.bias.copy_(saved)


def test_nan_frame_timestamps_end_in_the_trainers_error(trainer_and_batch):
    trainer, batch = trainer_and_batch
    timestamps = batch["frame_timestamps"].clone()
    timestamps[0, 1] = float("nan")
    _expect_non_finite_error(trainer, {**batch, "frame_timestamps": timestamps})


def test_nan_pixel_values_end_in_the_trainers_error(trainer_and_batch):
    trainer, batch = trainer_and_batch
    pixels = batch["pixel_values"].clone()
    pixels[0] = float("nan")
    _expect_non_finite_error(trainer, {**batch, "pixel_values": pixels})


def test_matcher_assigns_despite_non_finite_costs_and_keeps_finite_rows_optimal():
    matcher = SpanHungarianMatcher(cost_span=1.0, cost_giou=0.0, cost_class=0.0)
    spans = torch.tensor([[[0.2, 0.2], [0.7, 0.2]], [[float("nan"), 0.1], [0.5, float("inf")]]])
    targets = [torch.tensor([[0.6, 0.8]]), torch.tensor([[0.1, 0.3]])]
    indices = matcher(spans, torch.zeros(2, 2, 2), targets)
    assert indices[0][0].tolist() == [1] and indices[0][1].tolist() == [0]  # a finite sample: the optimum
    assert len(indices[1][0]) == 1 and len(indices[1][1]) == 1  # a non-finite sample still gets a pairing
