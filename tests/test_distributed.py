"""Two CPU processes (torchrun, gloo): DDP without find_unused_parameters on task-disjoint ranks, and
TPOTrainer on mixed-task batches. Parameters must stay identical across ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"

pytestmark = pytest.mark.slow  # every test launches two processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(tmp_path: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(WORKER), "--out", str(tmp_path), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_ddp_region_rank_and_temporal_rank_stay_identical(tmp_path):
    ranks = _torchrun(tmp_path, "--steps", "2")
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    # the ranks saw different data (different losses) yet hold the same parameters
    assert ranks[0]["losses"] != ranks[1]["losses"]
    # each rank's first loss is the undistributed model's loss on that rank's own batch, the span terms divided
    # by the mean number of spans per process (as DETR does): (0 + 2) / 2 = 1, where one process alone divides by 2
    model, tokenizer = ddp_worker.build_model()
    model.mllm.model.vision_tower.requires_grad_(False)
    temporal_loss = model.temporal_head.loss
    model.temporal_head.loss = lambda outputs, targets, num_spans=None: temporal_loss(outputs, targets, 1.0)
    for rank in range(2):
        batch = ddp_worker.rank_batch(rank, tokenizer, model.config)
        with torch.no_grad():
            assert model(**batch).loss.item() == pytest.approx(ranks[rank]["losses"][0], rel=1e-5), rank


def test_trainer_two_processes_mixed_batches(tmp_path):
    ranks = _torchrun(tmp_path, "--trainer", "--steps", "2")
    assert ranks[0]["world"] == 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert {"loss/lm", "loss/assign"} <= set(ranks[0]["logged_terms"])


def test_run_tpo_two_processes_evaluate_and_write_once(tmp_path):
    """The README's 2-process launch of run_tpo.py: both ranks train, the main process alone saves the final
    model, evaluates the test split and writes eval_results.json and the predictions (one table, one file)."""
    from tpo.processing.synthetic import generate_synthetic_benchmark

    generate_synthetic_benchmark(tmp_path / "synthetic", size="small", seed=0, workers=1)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(repo / "examples" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
               str(repo / "examples" / "run_tpo.py"), "--use_cpu", "true", "--synthetic_dir", str(tmp_path / "synthetic"),
               "--synthetic_size", "small", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
               "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "0",
               "--tiny_num_layers", "1", "--num_frames", "4", "--disable_tqdm", "true"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, f"launch failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    assert result.stdout.count("metrics: ") == 1 and result.stdout.count("region/acc@0.5") == 1
    assert "Process 1: training done; the main process saves and evaluates." in result.stderr
    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert "region/acc@0.5" in saved and (tmp_path / "run" / "final" / "config.json").exists()
    assert not (tmp_path / "run" / ".tpo_run.lock").exists()
