"""`examples/evaluate_tpo.py predict` over the benchmarks that have their own protocol: multiple-choice video QA
(formats mvbench, videomme, mlvu, multiple_choice: `tpo.processing.benchmark_readers`) and single-object tracking
(formats lasot, got10k: `tpo.processing.tracking_readers`). Each spec writes its files in `output_dir` and is
described as `predict_summary.json` describes files (path, benchmark, records, the `evaluate_tpo.py` arguments
that score it, a note).

    {"format": "mvbench", "root": "MVBench", "tasks": [...], "convention": "official" | "lmms_eval"}
    {"format": "videomme", "annotations": "videomme/test-00000-of-00001.parquet", "video_dir": "data"}
    {"format": "mlvu", "root": "MLVU"}
    {"format": "multiple_choice", "json": "q.jsonl", "media_dir": "videos", "fields": {"answer": "gt"}}
    {"format": "lasot", "root": "LaSOT", "sequences": "LaSOT/testing_set.txt"}
    {"format": "got10k", "root": "GOT-10k/val"}
"""

import logging
import re
from pathlib import Path

from ..processing.benchmark_readers import BENCHMARK_READERS
from ..processing.readers import read_spec
from ..processing.tracking_readers import TRACKING_READERS
from .multiple_choice import answer_choices, write_choice_results
from .tracking import TrackingConfig, track_sequence, write_tracking_results

logger = logging.getLogger(__name__)

TRACKING_SPEC_KEYS = ("format", "root", "sequences", "split", "dataset_name")


def is_benchmark_spec(spec: dict) -> bool:
    """Whether this module runs `spec` (a multiple-choice or tracking format) rather than `TaskEvaluator`."""
    return spec.get("format") in BENCHMARK_READERS or spec.get("format") in TRACKING_READERS


def _name(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "_", str(p)) for p in parts)


def predict_choice_spec(model, processor, spec: dict, output_dir: str, batch_size: int = 8,
                        max_samples: int | None = None, max_new_tokens: int = 16) -> dict:
    """Answer one multiple-choice spec; writes `<source>_<split>_answers.json` (+ its ground truth and
    `_accuracy.json`, see `write_choice_results`)."""
    spec = dict(spec)
    if max_samples is not None:
        spec["max_samples"] = min(int(spec.get("max_samples") or max_samples), int(max_samples))
    rows = read_spec(spec).to_list()
    if not rows:
        raise ValueError(f"Spec {spec}: no question read.")
    name = _name(rows[0]["source"], rows[0]["split"])
    answers = answer_choices(model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    written = write_choice_results(answers, output_dir, name)
    paths, scores = written["paths"], written["scores"]
    note = (f"accuracy counts every question (unread answers are wrong): {scores['unanswered']} unread, "
            f"{scores['media_errors']} with unreadable media; see {Path(paths['accuracy']).name}")
    if scores["dropped_empty"]:
        note += (f"; {scores['dropped_empty']} empty answers are left out as lmms-eval does, the mcqa subcommand "
                 "counts them wrong")
    return {"path": paths["answers"], "benchmark": spec["format"], "source": rows[0]["source"],
            "split": rows[0]["split"], "task": "text", "records": len(answers), "annotated": len(answers),
            "ground_truth": paths["ground_truth"], "accuracy_file": paths["accuracy"], "scores": scores,
            "evaluate": ["mcqa", "--predictions", paths["answers"], "--ground-truth", paths["ground_truth"]],
            "note": note}


def predict_tracking_spec(model, processor, spec: dict, output_dir: str, max_samples: int | None = None,
                          config: TrackingConfig | None = None) -> dict:
    """Track every sequence of one LaSOT / GOT-10k spec (at most `max_samples`); results in
    `<output_dir>/<source>_<split>_tracking/` in the toolkit's layout."""
    unknown = sorted(set(spec) - set(TRACKING_SPEC_KEYS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} for format {spec['format']!r}; expected {list(TRACKING_SPEC_KEYS)}.")
    if "root" not in spec:
        raise ValueError(f"Spec {spec}: a tracking spec needs `root` (the dataset folder).")
    protocol = spec["format"]
    sequences = TRACKING_READERS[protocol](spec["root"], spec.get("sequences"))
    chosen = sequences[: max_samples] if max_samples is not None else sequences
    source = spec.get("dataset_name", protocol)
    split = spec.get("split", "test")
    folder = Path(output_dir) / f"{_name(source, split)}_tracking"
    for sequence in chosen:
        result = track_sequence(model, processor, sequence, config)
        write_tracking_results(result, str(folder), protocol)
        logger.info("Tracked %s (%d frames, %.1f frames/s)", sequence.name, len(result.boxes_xywh),
                    len(result.boxes_xywh) / max(float(result.seconds_per_frame.sum()), 1e-9))
    annotated = sum(s.annotated for s in chosen)
    arguments, note = None, None
    if annotated < len(chosen):
        note = f"{len(chosen) - annotated} sequence(s) have only the first box (a test split): submit {folder} to the server"
    elif len(chosen) < len(sequences):
        note = f"{len(chosen)} of {len(sequences)} sequences tracked: the tracking subcommand needs them all"
    else:
        arguments = ["tracking", "--predictions", str(folder), "--ground-truth", str(spec["root"]),
                     "--protocol", protocol]
    return {"path": str(folder), "benchmark": "tracking", "source": source, "split": split, "task": "mask",
            "records": len(chosen), "annotated": annotated, "ground_truth": str(spec["root"]), "evaluate": arguments,
            "note": note}


def predict_benchmark_specs(model, processor, specs: list[dict], output_dir: str, batch_size: int = 8,
                            max_samples: int | None = None, max_new_tokens: int = 16,
                            tracking: TrackingConfig | None = None) -> tuple[list[dict], list[dict]]:
    """Run the benchmark specs among `specs`; returns (the other specs, the descriptions of the files written)."""
    files = []
    for spec in specs:
        if spec.get("format") in TRACKING_READERS:
            files.append(predict_tracking_spec(model, processor, spec, output_dir, max_samples, tracking))
        elif spec.get("format") in BENCHMARK_READERS:
            files.append(predict_choice_spec(model, processor, spec, output_dir, batch_size, max_samples,
                                             max_new_tokens))
    return [s for s in specs if not is_benchmark_spec(s)], files
