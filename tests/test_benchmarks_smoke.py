"""The benchmarks still run: each measurement function on the micro size for one step returns positive,
finite figures (the figures themselves are the benchmarks' business, not CI's)."""

import math
from pathlib import Path

import pytest
import torch
from script_loader import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    return load_script(f"benchmarks/{name}.py")


def _positive_finite(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: tiny models gain nothing from more, and a loaded machine makes them far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def overhead():
    return _load("bench_model_overhead")


def test_model_overhead_benchmark_runs(overhead):
    result = overhead.measure_overhead("micro", steps=1, warmup=0, batch_size=2, num_frames=2, verbose=False)
    assert _positive_finite(result["ratio"], result["bare_ms"], result["tpo_ms"])
    assert {"region", "temporal"} <= set(result["losses"])  # both heads trained on real targets
    assert result["ratio"] == pytest.approx(result["tpo_ms"] / result["bare_ms"])
    assert 0 < result["tpo_params_m"] < result["params_m"]


def test_mask_cost_benchmark_runs(overhead):
    result = overhead.measure_mask_cost("micro", steps=1, warmup=0, batch_size=2, num_mask=1, sam2_image_size=64,
                                        verbose=False)
    assert _positive_finite(result["ratio_region"], result["ratio_mixed"], result["ms_per_mask_sample"],
                            result["relative_to_bare_sample"])
    assert math.isfinite(result["ms_per_mask_sample_end_to_end"])  # a difference of two timings: its sign is noise
    # the figures are the timings' ratios (one step, one mask, 2 samples: each median is the one timing)
    assert result["ratio_region"] == pytest.approx(result["tpo_region_ms"] / result["bare_ms"])
    assert result["ratio_mixed"] == pytest.approx(result["tpo_mixed_ms"] / result["bare_ms"])
    assert result["ms_per_mask_sample"] == pytest.approx(result["head_ms"])
    assert result["relative_to_bare_sample"] == pytest.approx(result["head_ms"] / (result["bare_ms"] / 2))
    assert result["ms_per_mask_sample_end_to_end"] == pytest.approx(result["tpo_mixed_ms"] - result["tpo_region_ms"])


@pytest.mark.parametrize("task", ["region", "temporal"])
def test_generation_benchmark_runs(task):
    generation = _load("bench_generation")
    result = generation.measure_generation("micro", task, batch_size=2, repeats=1, warmup=0, num_frames=2,
                                           verbose=False)
    assert _positive_finite(result["tokens_ratio"], result["time_ratio"], result["tpo_ms_per_sample"],
                            result["text_ms_per_sample"])
    assert result["tpo_tokens"] == 3 and result["text_tokens"] > result["tpo_tokens"]
    assert result["tokens_ratio"] == pytest.approx(result["text_tokens"] / 3)
    assert result["time_ratio"] == pytest.approx(result["text_ms_per_sample"] / result["tpo_ms_per_sample"])
