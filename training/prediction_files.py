"""Prediction files of `examples/evaluate_tpo.py predict`: the predictions of `TaskEvaluator.predict` grouped by
(source, split, kind) and written in the formats the scoring functions of `tpo.training.benchmark_scoring` read,
each described with the `evaluate_tpo.py` arguments that score it. The file table is in the README's evaluation
section and in `evaluate_tpo.py predict --help`.
"""

import json
import logging
import shlex
from pathlib import Path

from .benchmark_scoring import read_records
from .metrics import to_submission

logger = logging.getLogger(__name__)


def safe_name(text: str) -> str:
    """`text` usable as a file name: characters other than letters, digits and `._-` become `_` (empty: "dataset")."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(text)) or "dataset"


def _box_record(sample: dict, prediction: dict) -> dict:
    x0, y0, x1, y1 = (float(v) for v in prediction["pred_box"])
    return {"id": sample["id"], "bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_xyxy": [x0, y0, x1, y1],
            "image_id": json.loads(sample["meta"]).get("image_id")}


def _video_mask_record(sample: dict, prediction: dict) -> dict:
    """{"id", "video_id", "exp_id", "masks": [RLE or null per frame]}: predicted frames at their index."""
    frames = [int(f) for f in prediction.get("frames") or []]
    count = len(sample["frame_paths"]) or (max(frames) + 1 if frames else 0)
    masks = [None] * count
    for frame, rle in zip(frames, prediction["pred_rle"]):
        masks[frame] = rle
    meta = json.loads(sample["meta"])
    return {"id": sample["id"], "video_id": meta.get("video"), "exp_id": meta.get("expression"), "masks": masks}


def _original_llava_id(sample: dict) -> str:
    """The conversation record's own id (the reader names samples `llava-<id>`), as the mcqa ground truth has it."""
    return sample["id"][len("llava-"):] if sample["id"].startswith("llava-") else sample["id"]


def _prediction_records(predictions, entries: dict) -> dict:
    """{(source, split, kind): {"benchmark", "task", "specs", "records", "ground_truth", "annotated"}}."""
    groups: dict = {}

    def add(prediction_id, task, kind, benchmark, record, ground_truth=None):
        entry = entries[prediction_id]
        sample = entry["sample"]
        key = (sample["source"] or "dataset", sample["split"] or "all", kind)
        group = groups.setdefault(key, {"benchmark": None, "task": task, "specs": set(), "records": [],
                                        "ground_truth": [], "annotated": 0})
        group["benchmark"] = group["benchmark"] or benchmark
        group["specs"].add(entry["spec"])
        group["records"].append(record)
        group["annotated"] += int(entry["annotated"])
        if ground_truth is not None and entry["annotated"]:
            group["ground_truth"].append(ground_truth)

    for p in predictions.temporal:
        fmt = entries[p["id"]]["format"]
        if fmt == "qvhighlights":
            add(p["id"], "temporal", "submission.jsonl", "qvhighlights", to_submission(p["qid"], p["windows"], p["clip_scores"]))
        else:
            add(p["id"], "temporal", "windows.jsonl", "charades" if fmt == "charades_sta" else None,
                to_submission(p["id"], p["windows"]))
    for p in predictions.region:
        add(p["id"], "region", "boxes.json", "refcoco", _box_record(entries[p["id"]]["sample"], p))
    for p in predictions.mask:
        sample, fmt = entries[p["id"]]["sample"], entries[p["id"]]["format"]
        if sample["media_type"] == "image":
            ground_truth = {"id": p["id"], "mask": sample["masks_rle"][0]} if fmt == "refcoco" else None
            add(p["id"], "mask", "masks.json", "reasonseg", {"id": p["id"], "mask": p["pred_rle"][0]}, ground_truth)
        else:
            add(p["id"], "mask", "masks.json", "mevis" if fmt == "mevis" else None, _video_mask_record(sample, p))
    for p in predictions.text:
        sample = entries[p["id"]]["sample"]
        multiple_choice = entries[p["id"]]["format"] == "llava" and bool(sample["options"])
        add(p["id"], "text", "answers.json", "mcqa" if multiple_choice else None,
            {"id": _original_llava_id(sample), "prediction": p["prediction"]})
    return groups


def _count_records(path: str) -> int:
    try:
        return len(read_records(path))
    except (OSError, ValueError):
        return 0


def scoring_command(command_prefix: list[str] | None, arguments: list[str] | None) -> str | None:
    """The shell line `command_prefix + arguments`, or None when either is missing."""
    return shlex.join([*command_prefix, *arguments]) if arguments and command_prefix else None


def _evaluate_arguments(group: dict, spec: dict, path: str, ground_truth_path: str | None) -> tuple[list | None, str | None]:
    """The `evaluate_tpo.py` arguments that score `path`, and a note (why none, or what to know)."""
    benchmark = group["benchmark"]
    if benchmark is None and group["task"] == "text":
        return None, "open-ended answers: no subcommand scores them; --evaluate gives text/exact_match"
    if benchmark is None:
        return None, "no evaluate subcommand reads this dataset's ground truth; --evaluate gives the task metrics"
    if not group["annotated"]:
        return None, "no annotations (a test split): submit the file to the benchmark's evaluation server"
    if len(group["specs"]) > 1:
        return None, "the records come from several specs; evaluate each spec's predictions on its own"
    predicted = ["--predictions", path]
    if benchmark == "qvhighlights":
        arguments = ["qvhighlights", *predicted, "--ground-truth", str(spec["jsonl"])]
        if len(group["records"]) < _count_records(str(spec["jsonl"])):
            return arguments + ["--on-missing", "drop"], "only the predicted qids are evaluated (--on-missing drop)"
        return arguments, None
    if benchmark == "charades":
        return ["charades", *predicted, "--ground-truth", str(spec["txt"])], None
    if benchmark == "refcoco":
        if not str(spec["refs"]).endswith((".json", ".jsonl")):
            return None, "the refs are not JSON; --evaluate gives the task metrics"
        split = spec["split"] if "split" in spec else "train"  # read_refcoco's default
        return (["refcoco", *predicted, "--instances", str(spec["instances"]), "--refs", str(spec["refs"]),
                 "--dataset-name", str(spec.get("dataset_name", "refcoco"))] + (["--split", str(split)] if split else []),
                "expressions without prediction count as wrong")
    if benchmark == "reasonseg":
        if spec["format"] == "reasonseg":
            return (["reasonseg", *predicted, "--ground-truth", str(spec["folder"])],
                    "LISA's protocol evaluates text 0 of each image; add --all-texts for every text")
        return ["reasonseg", *predicted, "--ground-truth", ground_truth_path], "ground truth written from the samples read"
    if benchmark == "mevis":
        if not spec.get("mask_dict"):
            return None, "no mask_dict.json: evaluate with the benchmark's server or its own annotations"
        return (["mevis", *predicted, "--meta", str(spec["meta_expressions"]), "--mask-dict", str(spec["mask_dict"]),
                 "--dataset-name", str(spec.get("dataset_name", "mevis"))],
                "frames without a predicted mask count as empty")
    return ["mcqa", *predicted, "--ground-truth", str(spec["json"])], None


def write_benchmark_predictions(predictions, entries: dict, specs: list[dict], output_dir: str,
                                command_prefix: list[str] | None = None) -> list[dict]:
    """One file per (source, split, kind) in the formats the scoring subcommands read; returns their descriptions
    (`predict_summary.json`'s "files": path, benchmark, records, `evaluate` arguments and a note).

    `predictions`: a `TaskEvaluator.predict` result; `entries`: {sample id: {"spec": index into `specs`,
    "sample", "annotated", "format"}}; `command_prefix` (e.g. `["python", "examples/evaluate_tpo.py"]`) makes
    each file's "command", the shell line that scores it (None without a prefix or without arguments).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for (source, split, kind), group in sorted(_prediction_records(predictions, entries).items()):
        path = root / f"{safe_name(source)}_{safe_name(split)}_{kind}"
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in group["records"]), encoding="utf-8")
        else:
            path.write_text(json.dumps(group["records"], indent=None if group["task"] == "mask" else 1), encoding="utf-8")
        ground_truth_path = None
        if group["ground_truth"]:
            ground_truth_path = str(path.with_name(path.stem + "_ground_truth.json"))
            Path(ground_truth_path).write_text(json.dumps(group["ground_truth"]), encoding="utf-8")
        spec = specs[min(group["specs"])]
        arguments, note = _evaluate_arguments(group, spec, str(path), ground_truth_path)
        files.append({
            "path": str(path), "benchmark": group["benchmark"], "source": source, "split": split, "task": group["task"],
            "records": len(group["records"]), "annotated": group["annotated"], "ground_truth": ground_truth_path,
            "evaluate": arguments,
            "command": scoring_command(command_prefix, arguments),
            "note": note,
        })
        logger.info("Wrote %s (%d records)", path, len(group["records"]))
    return files
