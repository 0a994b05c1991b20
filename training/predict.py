"""`examples/evaluate_tpo.py predict` as library code: load a saved TPO checkpoint, read the reader specs of a
data file, predict every sample with `TaskEvaluator`, write the prediction files (`tpo.training.prediction_files`,
and `tpo.training.benchmark_predict` for multiple choice and tracking), the metrics and visualisations.
torch, transformers and the readers are imported inside the functions: the scoring command imports this module
for its argument choices and must not pay for them.
"""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from .benchmark_scoring import json_ready
from .prediction_files import safe_name, scoring_command, write_benchmark_predictions

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "auto")
NOT_TPO = ("{path} is a {model_type!r} checkpoint, not a TPO model (config.json has no TPO task tokens or heads). "
           "Wrap the MLLM first, TPOForConditionalGeneration.from_mllm(...), and train it (examples/run_tpo.py "
           "--model_name_or_path {path}); then pass the saved TPO folder (run_tpo.py writes <output_dir>/final) "
           "to --model.")


def _load_or_explain(loader, path: str, what: str):
    """`loader(path)`, with errors that name the path and what to pass instead."""
    try:
        return loader(path)
    except OSError as error:  # no such folder, no config / processor files, no Hub access
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such {what} folder (and not loadable from the Hub: "
                                    f"{str(error).splitlines()[0]}).") from error
        raise ValueError(f"{path}: cannot load the {what} ({str(error).splitlines()[0]}); pass a folder written by "
                         f"save_pretrained (examples/run_tpo.py writes <output_dir>/final).") from error


def load_tpo_checkpoint(model_path: str, processor_path: str | None = None, device: str | None = None,
                        dtype: str = "float32"):
    """(model in eval mode on `device`, processor) of a saved TPO checkpoint, loaded with the Auto classes
    (`trust_remote_code=True`). Raises ValueError for a checkpoint that is not a TPO model and for a
    processor whose task-token ids differ from the model's."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from ..processing.processing_tpo import TPOProcessor

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)}.")
    processor_path = processor_path or model_path
    if Path(model_path).is_dir() and not (Path(model_path) / "config.json").exists():
        raise ValueError(f"{model_path}: no config.json, so not a saved checkpoint; pass the folder written by "
                         f"save_pretrained (examples/run_tpo.py writes <output_dir>/final).")
    config = _load_or_explain(lambda p: AutoConfig.from_pretrained(p, trust_remote_code=True), model_path, "model")
    if getattr(config, "model_type", None) != "tpo" or not hasattr(config, "task_token_ids"):
        raise ValueError(NOT_TPO.format(path=model_path, model_type=getattr(config, "model_type", None)))
    processor = _load_or_explain(lambda p: AutoProcessor.from_pretrained(p, trust_remote_code=True), processor_path,
                                 "processor")
    if not hasattr(processor, "check_model_config"):
        raise ValueError(f"{processor_path}: the processor is a {type(processor).__name__}, not a TPOProcessor; save "
                         f"the TPO processor with the model (processor.save_pretrained(folder)) or pass its folder "
                         f"with --processor.")
    if not isinstance(processor, TPOProcessor):
        # AutoProcessor gave the checkpoint's own copy of the code (remote code); the evaluator that drives it
        # is this installed package's, so the processor comes from the same package (same settings and tokenizer).
        logger.info("Using the installed TPOProcessor (not the checkpoint's copy of its code) for %s", processor_path)
        processor = TPOProcessor.from_pretrained(processor_path)
    try:
        processor.check_model_config(config)
    except ValueError as error:
        raise ValueError(f"The processor of {processor_path} does not match the model {model_path}: {error}") from error
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True,
                                      dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def read_data_specs(path: str, split: str = "test") -> list[dict]:
    """Reader specs from a YAML / JSON file: one spec, a list of specs, a mapping {split: [specs]} (`split`
    picks one), or the synthetic benchmark's manifest ({"splits": {split: {part: spec}}})."""
    from .script_inputs import read_yaml_document

    source = Path(path)
    data = read_yaml_document(source, "--data (a YAML or JSON file of reader specs, see predict --help)")
    if isinstance(data, dict) and isinstance(data.get("splits"), dict):  # the synthetic manifest
        from ..processing.synthetic import resolve_manifest

        data = resolve_manifest(data, source.parent)["splits"]  # its paths are relative to its own folder
    if isinstance(data, dict) and "format" not in data:
        if split not in data:
            raise ValueError(f"{path}: no split {split!r}; the file has {sorted(data)} (choose one with --split).")
        data = data[split]
        if isinstance(data, dict) and "format" not in data:  # {part: spec}
            data = list(data.values())
    specs = [data] if isinstance(data, dict) else data
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) and "format" in s for s in specs):
        raise ValueError(f"{path}: expected reader specs such as {{\"format\": \"qvhighlights\", \"jsonl\": ..., "
                         f"\"video_dir\": ...}}: one, a list, or a mapping from split names to lists.")
    return [dict(spec) for spec in specs]


def _prepare_sample(sample: dict) -> tuple[dict, bool]:
    """(sample with sizes and durations filled, annotated?). A sample without annotations (a test split)
    gets placeholder targets so the processor accepts it; its predictions are kept, its metrics are not."""
    from ..processing.pipeline import probe_media
    from ..processing.schema import rle_from_mask

    sample = probe_media(dict(sample))
    task, (height, width) = sample["task"], sample["image_size"]
    if task == "temporal":
        annotated = bool(sample["spans_seconds"])
        if not annotated:
            sample["spans_seconds"] = [[0.0, float(sample["duration_seconds"])]]
    elif task == "region":
        annotated = bool(sample["boxes_xyxy_pixels"])
        if not annotated:
            sample["boxes_xyxy_pixels"] = [[0.0, 0.0, float(width), float(height)]]
    elif task == "mask":
        annotated = bool(sample["masks_rle"])
        if not annotated:
            empty = rle_from_mask(np.zeros((height, width), dtype=bool))
            count = len(sample["frame_paths"]) if sample["media_type"] == "frames" else 1
            sample["masks_rle"] = [empty] * count
            sample["mask_frame_indices"] = list(range(count)) if sample["media_type"] != "image" else []
    else:
        annotated = bool(sample["answer"]) or any(t["role"] == "assistant" for t in sample["conversations"])
    return sample, annotated


def read_prediction_samples(specs: list[dict], tasks, max_samples: int | None = None) -> list[dict]:
    """Samples of the specs (at most `max_samples` per spec) as entries {"spec": index, "sample",
    "annotated"}; tasks the model lacks and samples whose media cannot be read are left out (logged)."""
    from ..processing.readers import read_spec

    keep, entries, seen = set(tasks) | {"text"}, [], {}
    for index, spec in enumerate(specs):
        spec = dict(spec)
        if max_samples is not None:
            spec["max_samples"] = min(int(spec.get("max_samples") or max_samples), int(max_samples))
        left_out, unreadable = Counter(), 0
        for row in read_spec(spec).to_list():
            if row["task"] not in keep:
                left_out[row["task"]] += 1
                continue
            if row["id"] in seen:
                raise ValueError(f"Sample id {row['id']!r} comes from spec {seen[row['id']] + 1} and spec {index + 1}; "
                                 f"predictions are keyed by id, so give the specs distinct dataset names or splits.")
            seen[row["id"]] = index
            try:
                sample, annotated = _prepare_sample(row)
            except (OSError, ValueError, IndexError) as error:
                unreadable += 1
                logger.warning("Sample %r: media unreadable, not predicted (%s)", row["id"], error)
                continue
            entries.append({"spec": index, "sample": sample, "annotated": annotated})
        if left_out:
            logger.warning("Spec %d (%s): left out %s sample(s) of tasks the model does not have (it has %s).",
                           index + 1, spec["format"], dict(left_out), list(tasks))
        if unreadable:
            logger.warning("Spec %d (%s): %d sample(s) with unreadable media.", index + 1, spec["format"], unreadable)
    return entries


def _visualization_record(task: str, sample: dict, prediction: dict, annotated: bool):
    """(kind, record) in `tpo.visualization`'s JSON input format, or None if it cannot be drawn."""
    if task == "temporal":
        record = {"duration": float(sample["duration_seconds"]), "query": sample["query"],
                  "pred_relevant_windows": prediction["windows"], "pred_saliency_scores": prediction["clip_scores"],
                  "relevant_windows": prediction["gt_windows"] if annotated else []}
        if annotated and sample["saliency_scores"]:
            record.update(relevant_clip_ids=list(sample["saliency_clip_ids"]), saliency_scores=sample["saliency_scores"])
        if sample["media_type"] == "video":
            record.update(video=str(Path(sample["media_path"]).resolve()), num_thumbnails=8)
        return "timeline", record
    if task == "region":
        record = {"image": str(Path(sample["media_path"]).resolve()), "pred_boxes_xyxy": [prediction["pred_box"]]}
        if annotated:
            record["gt_boxes_xyxy"] = [list(sample["boxes_xyxy_pixels"][0])]
        return "boxes", record
    if sample["media_type"] == "image":
        record = {"image": str(Path(sample["media_path"]).resolve()), "pred_mask": prediction["pred_rle"][0]}
        if annotated:
            record["gt_mask"] = sample["masks_rle"][0]
        return "masks", record
    if sample["media_type"] != "frames":
        return None  # masks on an encoded video: the renderer draws frame images only
    frames = [int(f) for f in prediction.get("frames") or []]
    record = {"frames": [str(Path(sample["frame_paths"][f]).resolve()) for f in frames],
              "pred_masks": list(prediction["pred_rle"][: len(frames)]), "captions": [f"frame {f}" for f in frames]}
    if annotated:
        by_frame = dict(zip(sample["mask_frame_indices"], sample["masks_rle"]))
        record["gt_masks"] = [by_frame.get(f) for f in frames]
    return "masks", record


def write_visualizations(predictions, entries: dict, output_dir: str, per_task: int) -> list[str]:
    """Up to `per_task` PNGs per task under `output_dir/visualizations/<task>/`, each with its JSON record."""
    from ..visualization import render_record

    written = []
    for task in ("temporal", "region", "mask"):
        done = 0
        for prediction in getattr(predictions, task):
            if done >= per_task:
                break
            entry = entries[prediction["id"]]
            drawable = _visualization_record(task, entry["sample"], prediction, entry["annotated"])
            if drawable is None:
                logger.info("No visualisation of %r (masks on an encoded video).", prediction["id"])
                continue
            kind, record = drawable
            folder = Path(output_dir) / "visualizations" / task
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{safe_name(prediction['id'])}.png"
            try:
                render_record(kind, record).save(path, format="PNG")
            except (OSError, ValueError) as error:
                logger.warning("Cannot draw %r: %s", prediction["id"], error)
                continue
            path.with_suffix(".json").write_text(json.dumps(record), encoding="utf-8")
            written.append(str(path))
            done += 1
    return written


def annotated_only(predictions, entries: dict):
    """`predictions` (a `Predictions`) without the samples that have no annotations (`entries[id]["annotated"]`)."""
    from .evaluation import Predictions

    def keep(items):
        return [p for p in items if entries[p["id"]]["annotated"]]

    return Predictions(router=list(predictions.router), routing=keep(predictions.routing),
                       temporal=keep(predictions.temporal), region=keep(predictions.region),
                       mask=keep(predictions.mask), text=keep(predictions.text))


def _predict_benchmarks(model, processor, specs: list[dict], output_dir: str, batch_size: int,
                        max_samples: int | None, max_new_tokens: int, tracking_first_frame: str,
                        tracking_lost_target: str, evaluate: bool, command_prefix: list[str] | None,
                        score_arguments) -> tuple[list[dict], list[dict]]:
    """Multiple-choice and tracking specs (issue 17), run by `tpo.training.benchmark_predict`: (the other specs,
    their file descriptions with the command that scores each, and its metrics with `evaluate`)."""
    from .benchmark_predict import predict_benchmark_specs
    from .tracking import TrackingConfig

    tracking = TrackingConfig(first_frame=tracking_first_frame, lost_target=tracking_lost_target)
    specs, files = predict_benchmark_specs(model, processor, specs, output_dir, batch_size=batch_size,
                                           max_samples=max_samples, max_new_tokens=max_new_tokens,
                                           tracking=tracking)
    for entry in files:
        arguments = entry["evaluate"]
        entry["command"] = scoring_command(command_prefix, arguments)
        if evaluate and arguments and score_arguments is not None:
            # the subcommand's own numbers, as fractions like the task metrics
            entry["metrics"] = {k: v / 100 for k, v in score_arguments(arguments).items() if isinstance(v, float)}
    return specs, files


def predict_dataset(model: str, data: str, output_dir: str, split: str = "test", processor: str | None = None,
                    batch_size: int = 8, max_samples: int | None = None, max_new_tokens: int = 16,
                    mask_frames_per_video: int = 0, mask_video_mode: str = "propagate",
                    tracking_first_frame: str = "mask_head", tracking_lost_target: str = "previous",
                    device: str | None = None, dtype: str = "float32", evaluate: bool = False, visualize: int = 0,
                    command_prefix: list[str] | None = None, score_arguments=None) -> dict:
    """Run the checkpoint folder `model` over the reader specs of `data` (`read_data_specs`, `split`) and write
    the prediction files, `predict_summary.json` and (with `evaluate`) `metrics.json` in `output_dir`; returns
    the summary. The arguments are `evaluate_tpo.py predict`'s flags (see its --help for each).

    `mask_frames_per_video`: video mask samples segment that many evenly spaced annotated frames (0: all);
    `visualize`: PNGs per task under `output_dir/visualizations/`; `command_prefix`: the start of each file's
    scoring command line (`["python", "examples/evaluate_tpo.py"]`); `score_arguments(arguments) -> metrics`
    scores a file's `evaluate` arguments (the scoring subcommand's metrics in %), used with `evaluate` for the
    multiple-choice and tracking files. Metrics in the summary are fractions in [0, 1].
    """
    from ..processing.pipeline import evenly_spaced_mask_frames
    from .evaluation import TaskEvaluator, compute_task_metrics, format_table

    if batch_size < 1 or (max_samples is not None and max_samples < 1):
        raise ValueError("--batch-size and --max-samples must be at least 1.")
    specs = read_data_specs(data, split)
    tpo_model, tpo_processor = load_tpo_checkpoint(model, processor, device, dtype)
    logger.info("Model %s: tasks %s, on %s (%s)", model, list(tpo_model.config.tasks),
                next(tpo_model.parameters()).device, next(tpo_model.parameters()).dtype)
    specs, benchmark_files = _predict_benchmarks(tpo_model, tpo_processor, specs, output_dir, batch_size, max_samples,
                                                 max_new_tokens, tracking_first_frame, tracking_lost_target,
                                                 evaluate, command_prefix, score_arguments)
    entries = read_prediction_samples(specs, tpo_model.config.tasks, max_samples) if specs else []
    if not entries and not benchmark_files:
        raise ValueError(f"{data}: no sample to predict (see the warnings above).")
    for entry in entries:
        entry["format"] = specs[entry["spec"]]["format"]
    if mask_frames_per_video < 0:
        raise ValueError("--mask-frames-per-video must be 0 (every annotated frame) or more.")
    for entry in entries:  # evaluation scores every annotated frame unless asked for fewer
        entry["sample"] = evenly_spaced_mask_frames(entry["sample"], mask_frames_per_video)
    by_id = {entry["sample"]["id"]: entry for entry in entries}
    evaluator = TaskEvaluator(tpo_processor, [e["sample"] for e in entries], batch_size=batch_size,
                              max_new_tokens=max_new_tokens, mask_video_mode=mask_video_mode,
                              rank_options=evaluate)  # ranking the options serves only the metrics
    predictions = evaluator.predict(tpo_model)
    predicted = {p["id"] for task in ("temporal", "region", "mask", "text") for p in getattr(predictions, task)}
    missing = [i for i in by_id if i not in predicted]
    if missing:
        logger.warning("%d sample(s) have no prediction (e.g. %s); see the warnings above.", len(missing), missing[:3])
    output_path = Path(output_dir)
    files = write_benchmark_predictions(predictions, by_id, specs, str(output_path), command_prefix)
    summary = {"model": model, "data": data, "split": split, "samples": len(entries),
               "predicted": len(predicted), "annotated": sum(e["annotated"] for e in entries),
               "files": files + benchmark_files}
    if visualize:
        summary["visualizations"] = write_visualizations(predictions, by_id, str(output_path), visualize)
    if evaluate:
        metrics = compute_task_metrics(annotated_only(predictions, by_id))
        metrics.update({f"{f['source']}/{k}": v for f in benchmark_files for k, v in f.get("metrics", {}).items()})
        if not metrics:
            logger.warning("No annotated sample was predicted: no metrics.")
        summary["metrics"] = metrics
        (output_path / "metrics.json").write_text(json.dumps(json_ready(metrics), indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")
        logger.info("Task metrics on %d annotated samples:\n%s", summary["annotated"], format_table(metrics))
    (output_path / "predict_summary.json").write_text(json.dumps(json_ready(summary), indent=2) + "\n",
                                                      encoding="utf-8")
    return summary
