"""Training throughput of the embedded default run, the share of step time spent waiting for data, and
peak memory, as figures of one run.

The default configuration (examples/configs/synthetic_default.yaml: tiny LLaVA + tiny SAM2, the synthetic
benchmark, batch 16, 2 DataLoader workers decoding video with PyAV) trains its joint stage (every head,
the LM and conversation data) for `--steps` steps. Waiting for data is the time the training loop
spends in `next()` on the DataLoader (`Trainer.get_batch_samples`); the first batch, which includes the
workers' start-up, is reported on its own and left out of the steady-state share. Target: under 5%.

    python benchmarks/bench_training.py [--steps 60] [--workers 2] [--stage joint]
"""

import argparse
import dataclasses
import importlib.util
import logging
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_run_tpo():
    spec = importlib.util.spec_from_file_location("run_tpo", REPO_ROOT / "examples" / "run_tpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_trainer_class(base):
    """`base` whose batch fetching is timed: `data_wait_seconds` holds one entry per optimiser step."""

    class TimedTrainer(base):
        data_wait_seconds: list

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            start = time.perf_counter()
            result = super().get_batch_samples(epoch_iterator, num_batches, device)
            self.data_wait_seconds.append(time.perf_counter() - start)
            return result

    return TimedTrainer


def peak_rss_mib() -> tuple[float, float]:
    """(this process, largest finished child process) peak resident memory in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps to time")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--stage", default="joint", choices=("assign", "task", "joint"))
    parser.add_argument("--output-dir", default="outputs/bench-training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    run_tpo = load_run_tpo()
    from tpo.processing.data_collator import TPODataCollator
    from tpo.processing.pipeline import encode_dataset
    from tpo.training.trainer import TPOTrainer

    script, model_args, training_args = run_tpo.parse_arguments([])
    data = run_tpo.load_data(script)
    model, processor = run_tpo.build_model(model_args, [data["train"]])
    train = encode_dataset(data["train"], processor, mode="train")
    if args.stage == "task":
        train = train.filter(lambda row: row["task_label"] != 0)
    stage_args = dataclasses.replace(
        training_args, stage=args.stage, output_dir=args.output_dir, max_steps=args.steps, logging_steps=10 ** 6,
        dataloader_num_workers=args.workers, disable_tqdm=True, learning_rate=1e-3,
    )
    trainer_class = timed_trainer_class(TPOTrainer)
    trainer = trainer_class(model=model, args=stage_args, train_dataset=train, data_collator=TPODataCollator(processor),
                            processing_class=processor)
    trainer.data_wait_seconds = []
    start = time.perf_counter()
    trainer.train()
    total_seconds = time.perf_counter() - start
    waits = trainer.data_wait_seconds
    batch = stage_args.per_device_train_batch_size * stage_args.gradient_accumulation_steps
    steady_total = total_seconds - waits[0]
    own_mib, worker_mib = peak_rss_mib()
    print(f"stage {args.stage}: {len(waits)} steps of {batch} samples, {args.workers} DataLoader workers, "
          f"{total_seconds:.1f} s")
    print(f"throughput: {batch * (len(waits) - 1) / steady_total:.2f} samples/s (steady state, after the first batch)")
    print(f"first batch (worker start-up): {waits[0]:.2f} s")
    print(f"waiting for data: {sum(waits[1:]):.2f} s of {steady_total:.1f} s = "
          f"{100 * sum(waits[1:]) / steady_total:.2f}% of step time (target < 5%)")
    print(f"peak memory: main process {own_mib:.0f} MiB, largest DataLoader worker {worker_mib:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
