"""Generating a grounding answer with TPO's task tokens against generating the same box / span as text
coordinates, through the same MLLM and tokenizer.

    python benchmarks/bench_generation.py                           # micro, tiny and ~100M, region and temporal
    python benchmarks/bench_generation.py --sizes 100m --batch-size 8 --repeats 5 --threads 1

What is measured
----------------
For the same prompts (a batch of `--batch-size` region questions on images, then one of temporal
questions on `--num-frames`-frame videos, encoded by `TPOProcessor` in "generate" mode, left padded):

- TPO: `TPOForConditionalGeneration.generate` with a logits processor that makes the model emit the
  task's begin token (`<box_begin>` / `<time_begin>`); TPO's own processor forces the slot token after
  it, then the end of turn is forced: 3 new tokens (prefill + 2 cached decode steps), after which the
  head reads the hidden states decoding computed (the box / spans come from the head).
- text: the bare MLLM's `generate` (same weights) with a logits processor forcing, token by token, the
  answer written as text: "[x0, y0, x1, y1]" normalised with 2 decimals for boxes, "[start, end]" in
  seconds with 1 decimal for spans, then the end of turn. Both sides do real decode steps with the KV
  cache; only which token wins is forced (the models are untrained).

Printed per (size, task): new tokens per answer (decode steps of `generate`, prefill included), wall time
per sample (median over `--repeats` interleaved rounds after `--warmup`, divided by the batch size), and
the ratios text / TPO of both. "TPO heads pass" is TPO's time minus the same generation with
`run_task_heads=False` (its own interleaved run): the heads and the bookkeeping of their inputs, printed
also in units of one prefill (the bare MLLM's `generate` with `max_new_tokens=1`, also interleaved). The
heads reuse decoding's hidden states (a hook on the backbone), so no prompt is encoded twice; where that
is impossible (no KV cache, beam search) one forward pass over the sequences replaces it, about one
prefill. In the micro size the temporal head itself costs about a prefill of the 0.2 M-parameter MLLM. The
number of text tokens depends on the tokenizer: the tiny byte-level tokenizer writes one token per
character, as Qwen2's does for digits.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model_overhead import (  # noqa: E402
    SIZES,
    build_batch,
    build_models,
    make_sample,
    resolve_device,
    synchronize,
)

TASK_SAMPLE = {"region": "region", "temporal": "temporal"}


class ForceAnswer(LogitsProcessor):
    """Row i emits `answers[i][step]` at generation step `step` (step 0 is the prefill's token); rows
    past their answer are left alone (they have emitted the end of sequence, generate pads them)."""

    def __init__(self, prompt_length: int, answers: list[list[int]]):
        self.prompt_length = prompt_length
        self.answers = answers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        rows = [i for i, answer in enumerate(self.answers) if step < len(answer)]
        if not rows:
            return scores
        scores = scores.clone()
        index = torch.tensor(rows, device=scores.device)
        tokens = torch.tensor([self.answers[i][step] for i in rows], device=scores.device)
        scores[index] = torch.finfo(scores.dtype).min
        scores[index, tokens] = 0.0
        return scores


def text_answer(sample: dict, task: str, box_decimals: int = 2, span_decimals: int = 1) -> str:
    """The grounding answer as text: "[x0, y0, x1, y1]" normalised to the image (region) or
    "[start, end]" in seconds (temporal)."""
    if task == "region":
        height, width = sample["image_size"]
        x0, y0, x1, y1 = sample["boxes_xyxy_pixels"][0]
        values = [x0 / width, y0 / height, x1 / width, y1 / height]
        return "[" + ", ".join(f"{v:.{box_decimals}f}" for v in values) + "]"
    if task == "temporal":
        return "[" + ", ".join(f"{v:.{span_decimals}f}" for v in sample["spans_seconds"][0]) + "]"
    raise ValueError(f"Unknown task {task!r}; use 'region' or 'temporal'.")


def answers(model, processor, samples: list[dict], task: str) -> tuple[list[list[int]], list[list[int]]]:
    """(TPO answers, text answers): token ids per sample, each ending with the end of turn."""
    end = model.generation_config.eos_token_id
    end = end[0] if isinstance(end, (list, tuple)) else end
    ids = model.config.task_token_ids[task]
    tpo = [[ids["begin"], *ids["slots"], end] for _ in samples]
    tokenizer = processor.tokenizer
    text = [tokenizer(text_answer(s, task), add_special_tokens=False).input_ids + [end] for s in samples]
    return tpo, text


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of `fn()`, `device` synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def measure_generation(size: str = "micro", task: str = "region", batch_size: int = 8, repeats: int = 5,
                       warmup: int = 1, num_frames: int = 4, device: str | None = None,
                       dtype: torch.dtype = torch.float32, verbose: bool = True) -> dict:
    """Time TPO's grounding answer against the text-coordinate answer on one batch of `task` prompts.

    Returns {"tpo_tokens", "text_tokens", "tokens_ratio", "tpo_ms_per_sample", "text_ms_per_sample",
    "time_ratio", "heads_pass_ms_per_sample", "prefill_ms_per_sample", "prompt_tokens"}; ratios are text / TPO.
    """
    device = resolve_device(device)
    model, bare, processor = build_models(size, ["region", "temporal"], num_frames=num_frames, device=device,
                                          dtype=dtype)
    model.eval()
    bare.eval()
    image_size = model.config.mllm_config.vision_config.image_size
    samples = [make_sample(TASK_SAMPLE[task], i, image_size) for i in range(batch_size)]
    batch = build_batch(processor, samples, device, dtype, mode="generate")
    prompt_length = batch["input_ids"].shape[1]
    mllm_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    tpo_answers, text_answers = answers(model, processor, samples, task)
    settings = dict(do_sample=False, num_beams=1)

    def run_tpo(run_task_heads: bool = True):
        force = LogitsProcessorList([ForceAnswer(prompt_length, tpo_answers)])
        return model.generate(**batch, logits_processor=force, max_new_tokens=max(map(len, tpo_answers)),
                              run_task_heads=run_task_heads, **settings)

    def run_text():
        force = LogitsProcessorList([ForceAnswer(prompt_length, text_answers)])
        return bare.generate(**mllm_inputs, logits_processor=force, max_new_tokens=max(map(len, text_answers)),
                             **settings)

    def run_prefill():
        return bare.generate(**mllm_inputs, max_new_tokens=1, **settings)

    runs = {"tpo": run_tpo, "tpo_no_heads": lambda: run_tpo(False), "text": run_text, "prefill": run_prefill}
    times = {name: [] for name in runs}
    outputs = {}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, run in runs.items():
                seconds, outputs[name] = timed(run, device)
                if round_index >= warmup:
                    times[name].append(seconds)
    outputs.pop("prefill")
    _check(outputs, tpo_answers, text_answers, prompt_length, task)
    medians = {name: statistics.median(values) for name, values in times.items()}
    tpo_tokens = outputs["tpo"].sequences.shape[1] - prompt_length
    text_tokens = outputs["text"].shape[1] - prompt_length
    result = {
        "prompt_tokens": prompt_length,
        "tpo_tokens": tpo_tokens,
        "text_tokens": text_tokens,
        "tokens_ratio": text_tokens / tpo_tokens,
        "tpo_ms_per_sample": medians["tpo"] / batch_size * 1e3,
        "text_ms_per_sample": medians["text"] / batch_size * 1e3,
        "time_ratio": medians["text"] / medians["tpo"],
        "heads_pass_ms_per_sample": (medians["tpo"] - medians["tpo_no_heads"]) / batch_size * 1e3,
        "prefill_ms_per_sample": medians["prefill"] / batch_size * 1e3,
    }
    if verbose:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"generation {size:>5} {task:>8} ({params:6.1f} M params, batch {batch_size}, prompt {prompt_length} "
              f"tokens, {repeats} rounds): new tokens TPO {tpo_tokens} + heads pass, text {text_tokens} "
              f"(ratio {result['tokens_ratio']:.2f})  |  time/sample TPO {result['tpo_ms_per_sample']:.2f} ms "
              f"(heads pass {result['heads_pass_ms_per_sample']:.2f} ms = "
              f"{result['heads_pass_ms_per_sample'] / result['prefill_ms_per_sample']:.2f} prefill), "
              f"text {result['text_ms_per_sample']:.2f} ms "
              f"(ratio {result['time_ratio']:.2f})", flush=True)
    return result


def _check(outputs: dict, tpo_answers, text_answers, prompt_length: int, task: str) -> None:
    """Both sides produced the forced answers, and TPO's head gave a prediction for every sample."""
    tpo = outputs["tpo"]
    for row, answer in enumerate(tpo_answers):
        if tpo.sequences[row, prompt_length:prompt_length + len(answer)].tolist() != answer:
            raise RuntimeError(f"TPO row {row} did not generate its forced answer.")
        if not tpo.task_outputs[row] or task not in tpo.task_outputs[row]:
            raise RuntimeError(f"TPO row {row} has no {task} prediction: the head did not run.")
    for row, answer in enumerate(text_answers):
        if outputs["text"][row, prompt_length:prompt_length + len(answer)].tolist() != answer:
            raise RuntimeError(f"Text row {row} did not generate its forced answer.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--tasks", nargs="+", default=["region", "temporal"], choices=list(TASK_SAMPLE))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--num-frames", type=int, default=4, help="frames per temporal video (LLaVA images)")
    parser.add_argument("--device", default=None, help="default: the current accelerator, else cpu")
    parser.add_argument("--dtype", default="float32", help="torch dtype name of the models")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.sizes:
        for task in args.tasks:
            result = measure_generation(size, task, args.batch_size, args.repeats, args.warmup, args.num_frames,
                                        args.device, getattr(torch, args.dtype))
            assert math.isfinite(result["time_ratio"])


if __name__ == "__main__":
    main()
