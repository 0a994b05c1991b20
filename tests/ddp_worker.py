"""Worker of the 2-process CPU DDP test (run with torchrun, gloo): rank 0 trains on region samples
only, rank 1 on temporal samples only (or, with --trainer, both ranks run TPOTrainer on mixed
batches). DDP runs WITHOUT find_unused_parameters; after the steps every rank writes a checksum of
its parameters, which the test compares."""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))


def build_model():
    """The seeded tiny LLaVA with temporal and region heads, the same on every rank; (model, tokenizer)."""
    from tiny_inputs import build_model as build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model("llava", tasks=("temporal", "region"))


def rank_batch(rank: int, tokenizer, config) -> dict:
    """Rank 0's batch: two region samples; rank 1's: two temporal samples (4-frame videos, seeded by rank)."""
    from tiny_inputs import SampleSpec, make_batch

    task = "region" if rank == 0 else "temporal"
    torch.manual_seed(100 + rank)
    batch = make_batch(tokenizer, config, [SampleSpec(visual="video", task=task, num_frames=4)] * 2)
    if task == "temporal":
        batch["frame_token_index"] = _llava_frame_index(batch["input_ids"], tokenizer, config)
        batch["temporal_spans"] = torch.tensor([[0.2, 0.6], [0.1, 0.4]])
        batch["temporal_span_query_index"] = torch.tensor([0, 1])
    return batch


def checksum(model) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def plain_ddp(out_dir: Path, steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    model, tokenizer = build_model()
    # The vision tower stays frozen, as usual: LLaVA reads SigLIP's last hidden state and never uses
    # SigLIP's own post-norm and pooling head, which DDP would report as unused.
    model.mllm.model.vision_tower.requires_grad_(False)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    batch = rank_batch(rank, tokenizer, model.config)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ddp(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"checksum": checksum(model), "losses": losses}))


def _llava_frame_index(input_ids, tokenizer, config):
    image = tokenizer.convert_tokens_to_ids("<image>")
    per_frame = config.mllm_config.image_seq_length
    is_image = input_ids == image
    order = is_image.long().cumsum(-1) - 1
    return torch.where(is_image, order // per_frame, torch.full_like(order, -1))


def trainer_run(out_dir: Path, steps: int) -> None:
    from datasets import Dataset
    from tiny_inputs import fake_media, training_samples
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tpo.processing.data_collator import TPODataCollator
    from tpo.processing.pipeline import encode_dataset
    from tpo.processing.processing_tpo import TPOProcessor
    from tpo.training.arguments import TPOTrainingArguments
    from tpo.training.trainer import TPOTrainer

    model, tokenizer = build_model()
    processor = TPOProcessor.from_model_config(model.config, SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                               tokenizer, num_frames=2)
    dataset = encode_dataset(Dataset.from_list(training_samples(32)), processor)
    args = TPOTrainingArguments(output_dir=str(out_dir / "trainer"), stage="joint", llm_training="full",
                                per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3, report_to=[],
                                save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                                logging_steps=1, ddp_find_unused_parameters=False)
    trainer = TPOTrainer(model=model, args=args, train_dataset=dataset,
                         data_collator=TPODataCollator(processor, media_loader=fake_media))
    trainer.train()
    terms = [entry for entry in trainer.state.log_history if "loss/lm" in entry]
    rank = dist.get_rank()
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({"checksum": checksum(model), "world": dist.get_world_size(), "logged_terms": sorted(terms[-1])})
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trainer", action="store_true")
    args = parser.parse_args()
    out_dir = Path(args.out)
    if args.trainer:
        trainer_run(out_dir, args.steps)  # the Trainer initialises the process group itself
    else:
        dist.init_process_group("gloo")
        plain_ddp(out_dir, args.steps)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
