"""Forward+backward time of TPOForConditionalGeneration against the bare MLLM on the same batch.

Both models hold the same weights; steps are interleaved (bare, TPO, bare, TPO, ...) in one run so
that machine noise hits both alike, and the ratio of medians is printed. Target: at most 1.05 (the
router and the region/temporal heads read hidden states that the MLLM computes anyway).

    python benchmarks/bench_model_overhead.py [--sizes tiny 100m] [--tasks region temporal] [--steps 10]
"""

import argparse
import statistics
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from tpo import TPOForConditionalGeneration
from tpo.training.tiny import build_tiny_tokenizer, tiny_llava_config


def llava_100m_config(tokenizer) -> LlavaConfig:
    """About 110 M parameters: SigLIP 512-wide x 6 layers, Qwen2 768-wide x 12 layers, 32k vocab."""
    config = tiny_llava_config(tokenizer, image_size=64, patch_size=8)
    config.vision_config = SiglipVisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                              num_attention_heads=8, image_size=64, patch_size=8)
    config.text_config = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                     num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True)
    return config


def build_batch(tokenizer, model, batch_size: int, seq_len: int, tasks: list[str]) -> dict:
    mllm_config = model.config.mllm_config
    image_id = mllm_config.image_token_id
    num_image_tokens = mllm_config.image_seq_length
    size = mllm_config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(50, 400, (batch_size, seq_len), generator=generator)
    ids[:, 1 : 1 + num_image_tokens] = image_id
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    task_ids = model.config.task_token_ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(batch_size, 3, size, size)}
    extra = {}
    if "region" in tasks:
        ids[:, -3] = task_ids["region"]["begin"]
        ids[:, -2] = task_ids["region"]["slots"][0]
        extra["region_boxes"] = torch.tensor([[0.1, 0.2, 0.6, 0.7]]).repeat(batch_size, 1)
        extra["region_batch_index"] = torch.arange(batch_size)
    labels = torch.where(labels == -100, labels, ids)
    batch.update(labels=labels, task_labels=torch.full((batch_size,), 2), **extra)
    return batch


def time_step(fn) -> float:
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    return time.perf_counter() - start


def run(size: str, tasks: list[str], steps: int, batch_size: int, seq_len: int) -> float:
    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_config(tokenizer) if size == "tiny" else llava_100m_config(tokenizer)
    torch.manual_seed(0)
    model = TPOForConditionalGeneration.from_mllm(LlavaForConditionalGeneration(config), tasks=tasks, tokenizer=tokenizer)
    bare = LlavaForConditionalGeneration(model.config.mllm_config)
    bare.load_state_dict(model.mllm.state_dict())
    model.train()
    bare.train()
    batch = build_batch(tokenizer, model, batch_size, seq_len, tasks)
    bare_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    parameters = sum(p.numel() for p in model.parameters())

    bare_times, tpo_times = [], []
    for step in range(steps + 2):  # two warm-up rounds
        bare.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        t_bare = time_step(lambda: bare(**bare_inputs).loss)
        t_tpo = time_step(lambda: model(**batch).loss)
        if step >= 2:
            bare_times.append(t_bare)
            tpo_times.append(t_tpo)
    ratio = statistics.median(tpo_times) / statistics.median(bare_times)
    print(
        f"{size:>5} ({parameters / 1e6:6.1f} M params, batch {batch_size} x {seq_len} tokens, tasks {tasks}): "
        f"bare {statistics.median(bare_times) * 1e3:8.1f} ms  TPO {statistics.median(tpo_times) * 1e3:8.1f} ms  "
        f"ratio {ratio:.3f}"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=["tiny", "100m"])
    parser.add_argument("--tasks", nargs="+", default=["region"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    for size in args.sizes:
        run(size, args.tasks, args.steps, args.batch_size, args.seq_len)


if __name__ == "__main__":
    main()
