"""Evaluate predictions against benchmark ground truth with the official metrics; prints the metrics JSON
and writes it with `--output`. `predict` runs a TPO checkpoint over a dataset and writes the predictions in
the formats these subcommands read.

    python examples/evaluate_tpo.py predict --model outputs/tpo-default/final --data data.yaml --split test --output-dir preds/ --evaluate
    python examples/evaluate_tpo.py qvhighlights --predictions preds.jsonl --ground-truth highlight_val_release.jsonl --output metrics.json
    python examples/evaluate_tpo.py charades --predictions preds.jsonl --ground-truth charades_sta_test.txt
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --ground-truth refcoco_val.jsonl
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --instances instances.json --refs refs.json --split val
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --instances instances.json --refs "refs(unc).p" --allow-pickle --split val
    python examples/evaluate_tpo.py reasonseg --predictions masks.json --ground-truth ReasonSeg/val
    python examples/evaluate_tpo.py mevis --predictions masks.json --meta meta_expressions.json --mask-dict mask_dict.json
    python examples/evaluate_tpo.py tracking --predictions results/ --ground-truth LaSOT/ --protocol lasot
    python examples/evaluate_tpo.py mcqa --predictions answers.json --ground-truth questions.json

A "records" file is a `.jsonl` file (one JSON object a line) or a `.json` file holding a list of objects.
Boxes are pixels; masks are COCO RLE `{"size": [H, W], "counts": "<string>"}`; spans are seconds.

qvhighlights
    predictions: the official submission jsonl, `{"qid", "pred_relevant_windows": [[start, end, score], ...],
    "pred_saliency_scores": [one per 2-second clip]}`; ground truth: QVHighlights jsonl, `{"qid", "duration",
    "relevant_windows": [[start, end]], "relevant_clip_ids", "saliency_scores": [[a1, a2, a3]]}`. Output: the
    official structure (`brief` with `MR-full-R1@0.5`, `MR-full-mAP`, `HL-min-VeryGood-mAP`, ..., then the
    per-range and per-level details), x100, 2 decimals. `--on-missing`: error (official) | wrong | drop.
charades
    ground truth: the Charades-STA text file, lines `VIDEOID START END##query`. Predictions: records with
    `qid` (or `id`) = `charades-<VIDEOID>-<line number>` (1-based line of the text file, the id of
    `tpo.processing.readers.read_charades_sta`) or `line` = the line number, and either
    `pred_relevant_windows` [[start, end, score], ...] (the first is the top-1) or `pred_span` [start, end].
    A line without prediction counts as IoU 0. Output: R1@0.3, R1@0.5, R1@0.7, mIoU (%).
refcoco
    predictions: records `{"id", "bbox": [x, y, w, h]}` (COCO) or `{"id", "bbox_xyxy": [x0, y0, x1, y1]}`.
    ground truth: records `{"id", "bbox": [x, y, w, h]}`, or `--refs` (JSON or JSONL refs: `ref_id`, `ann_id`,
    `split`, `sentences`, with `--instances`, the COCO instances json; the hub's parquet exports, which carry
    their boxes; or REFER's `refs(unc).p` with `--allow-pickle`, read by a restricted unpickler) and
    `--split`, giving the ids `<dataset>-<ref_id>-<sentence index>-box` of the RefCOCO reader. IoU as
    pycocotools computes it on (x, y, w, h) boxes, so ties at 0.5 fall the same way. A missing box is wrong.
    Output: Acc@0.5, mIoU (%).
reasonseg
    predictions: records `{"id", "mask": RLE}` (or `"masks": [RLE, ...]`, the first is used).
    ground truth: the ReasonSeg folder (`<name>.jpg` + `<name>.json` with polygon `shapes` and `text`; ids
    `reasonseg-<name>-<text index>`), built as LISA's `get_mask_from_json` builds it: json read as UTF-8 else
    cp1252, image size after EXIF orientation, points truncated to integers, polygons drawn as OpenCV draws
    them (outline + fill), "flag" shapes left out, labels containing "ignore" (any case) left out of I and
    U, painted largest first (so an ignore region inside a target is ignored); only text 0 of each image
    is evaluated, as LISA's validation does, unless `--all-texts`. Or records `{"id", "mask": RLE, "ignore":
    RLE (optional)}`. A missing mask is empty. Output: gIoU, cIoU (%).
mevis
    ground truth: `--meta meta_expressions.json` and `--mask-dict mask_dict.json` (MeViS / Ref-YouTube-VOS
    layout; the masks of all `anno_id`s of an expression are merged; ids `<dataset>-<video>-<expression>`)
    or `--ground-truth` records `{"id", "masks": [RLE or null per frame]}`. Predictions: records
    `{"id", "masks": [RLE or null per frame]}` (or `video_id` + `exp_id` instead of `id`), or the official
    submission folder `<dir>/<video>/<expression>/<frame>.png` (pixels > 0 are the mask). An expression
    predicted twice is refused; an expression without any prediction scores J = F = 0, as the MeViS
    evaluation scores a video missing from the submission; a missing frame of a predicted expression is an
    empty mask (the official script stops there). Output: J, F, J&F (%).
tracking
    ground truth: a LaSOT or GOT-10k folder, searched for `<sequence>/groundtruth.txt` (x,y,w,h a line);
    visibility from `full_occlusion.txt` + `out_of_view.txt` (LaSOT) or `cover.label` > 0 (GOT-10k;
    `absence.label` when there is no cover.label), the resolution from GOT-10k's `meta_info.ini`; or records
    `{"name", "gt_xywh": [[x, y, w, h], ...], "visible": [...], "resolution": [w, h]}` (the last two optional).
    Predictions: a folder of `<sequence>.txt` (LaSOT) or GOT-10k's `<sequence>/<sequence>_NNN.txt` (every
    run is pooled; LaSOT scores run 1), or records `{"name", "pred_xywh": [...]}` (or runs x frames x 4).
    `--protocol lasot|got10k|both`, with the official toolkits' rules (tpo.training.metrics.tracking):
    LaSOT counts absent frames as failures, GOT-10k clips boxes to the resolution. Every sequence needs a
    prediction; a sequence named twice, or a record naming no GT sequence, is refused; result files of no
    GT sequence are reported. Output: success_auc, precision@20, normalized_precision (@0.20) (LaSOT);
    AO, SR0.5, SR0.75 (GOT-10k) (%).
mcqa
    predictions: records `{"id", "prediction": "free text"}`; ground truth: records `{"id", "answer",
    "options": [...] (optional)}` where `answer` is a letter, or MVBench rows `{"candidates": [...], "answer":
    "<candidate text>"}` (ids default to the row index when absent on both sides); an optional `task_type`
    (or `question_type`, `group`) adds per-task accuracy and their mean. A missing answer is wrong.
    Records without `answer` (open-ended questions of a LLaVA file) are left out on both sides; ids are
    compared as strings. `--convention lmms-eval` reads answers as lmms-eval's MVBench task (lowercase "a",
    "A person ..." read as letters; empty answers left out of the denominator); the default counts those
    wrong (see tpo.training.metrics.mcqa for the table of differences). Output: accuracy, unparsed (%),
    accuracy/<task>, mean_group_accuracy (and empty % with lmms-eval).
predict
    Runs a TPO checkpoint (a folder saved by `save_pretrained`, e.g. `examples/run_tpo.py`'s
    `<output_dir>/final`, with its processor; `--processor` when the processor is saved elsewhere) over
    samples read by `tpo.processing.readers` and writes one prediction file per dataset and task in
    `--output-dir`. Model and processor load with `AutoModel` / `AutoProcessor` (`trust_remote_code=True`);
    a folder that is not a TPO model, or a processor whose task-token ids differ from the model's, is refused.
    `--data`: a YAML or JSON file with the reader specs of `tpo.processing.readers.read_spec`
    (`{"format": "qvhighlights", "jsonl": ..., "video_dir": ...}`; formats qvhighlights, charades_sta,
    activitynet_captions, refcoco, mevis, reasonseg, llava), as a list of specs, or a mapping from split
    names to lists of specs (`examples/run_tpo.py --data_config`, pick with `--split`, default test), or the
    synthetic benchmark's `manifest.json`. Paths in the specs are used as written (relative to the working
    directory), except a manifest's, which are relative to the manifest's folder. `--max-samples N` reads at most N samples per spec. Samples of tasks the model lacks are
    left out; samples without annotations (test splits) are predicted and left out of `--evaluate`.
    Benchmarks with their own protocol (`tpo.training.benchmark_predict`): multiple choice, formats mvbench,
    videomme, mlvu, multiple_choice (`*_answers.json` with the letter read from each answer as the benchmark
    reads it, `*_accuracy.json` overall / per task type, category, duration class; scored again by mcqa), and
    tracking, formats lasot and got10k (`<source>_<split>_tracking/` in the toolkit's layout, from each first box,
    `--tracking-first-frame`; scored by tracking).
    Files, named `<source>_<split>_<kind>` (source: the spec's dataset name or format):
      QVHighlights     `*_submission.jsonl`  the official submission (qid, pred_relevant_windows sorted by
                       score, pred_saliency_scores per 2-second clip) -> qvhighlights
      Charades-STA     `*_windows.jsonl`     `{"qid": "charades-<VIDEOID>-<line>", "pred_relevant_windows"}`
                       -> charades (ActivityNet Captions: the same records, no subcommand)
      RefCOCO boxes    `*_boxes.json`        `{"id", "bbox": [x, y, w, h], "bbox_xyxy", "image_id"}` -> refcoco
      RefCOCO masks    `*_masks.json` + `*_masks_ground_truth.json` `{"id", "mask": RLE}` -> reasonseg
      ReasonSeg        `*_masks.json`        `{"id", "mask": RLE}` -> reasonseg (its folder as ground truth)
      MeViS            `*_masks.json`        `{"id", "video_id", "exp_id", "masks": [RLE or null per frame]}`
                       -> mevis; every annotated frame (every frame of an unannotated video) is
                       segmented, SAM2 tracking from the first; `--mask-frames-per-video N` segments N evenly
                       spaced ones instead (faster), the others are null (empty for the benchmark)
      conversations    `*_answers.json`      `{"id": the LLaVA record id, "prediction"}` -> mcqa
    `predict_summary.json` lists each file with its record count and the evaluate command line that reads it
    (`evaluate`: the arguments of this script; null where no subcommand applies). `--evaluate` adds the task
    metrics (`task/metric`, fractions in [0, 1], on the annotated samples predicted) to the summary and
    `metrics.json`. `--visualize K` writes K PNGs per task under `visualizations/<task>/` (with the JSON
    record each was drawn from, re-drawable with `python -m tpo.visualization`).
"""

import argparse
import json
import logging
import math
import re
import shlex
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np

from tpo.training.metrics import (
    as_mask,
    charades_metrics,
    got10k_metrics,
    j_and_f,
    lasot_metrics,
    mask_iou_metrics,
    mcqa_accuracy,
    qvhighlights_eval,
    refcoco_accuracy_xywh,
    to_submission,
    xyxy_to_xywh,
)
from tpo.training.metrics.mcqa import ANSWER_CONVENTIONS
from tpo.training.metrics.tracking import TrackingSequence

logger = logging.getLogger("evaluate_tpo")


# ----------------------------------------------------------------------------------------------------
# File reading
# ----------------------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict]:
    """A `.jsonl` file (one object a line, blank lines skipped) or a `.json` list of objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}). A pickle (such as the public refs(unc).p) is never "
                         f"read; export it to JSON first.") from error
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {line_number}: not valid JSON ({error}); fix or remove the line.") from error
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); a .json file must hold a list of objects "
                             f"(use .jsonl for one object a line).") from error
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of JSON objects.")
    return records


def _index(records: list[dict], key_names: tuple[str, ...], path: str) -> dict:
    out = {}
    for index, record in enumerate(records):
        key = next((record[k] for k in key_names if k in record), None)
        if key is None:
            raise ValueError(f"{path} record {index + 1}: no {' or '.join(key_names)} field.")
        if key in out:
            raise ValueError(f"{path} record {index + 1}: id {key!r} appears twice.")
        out[key] = record
    return out


def _check_unknown(predicted: dict, known: set, path: str) -> None:
    unknown = [k for k in predicted if k not in known]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} prediction id(s) are not in the ground truth (e.g. {unknown[:3]}); "
                         f"the ids must follow the ground truth's naming (see --help).")


def _report_missing(missing: list, what: str) -> None:
    if missing:
        logger.warning("%d %s have no prediction and count as wrong (e.g. %s).", len(missing), what, missing[:3])


# ----------------------------------------------------------------------------------------------------
# One function per benchmark: (args) -> metrics dict
# ----------------------------------------------------------------------------------------------------


def evaluate_qvhighlights(args) -> dict:
    return qvhighlights_eval(read_records(args.predictions), read_records(args.ground_truth), on_missing=args.on_missing)


def read_charades_lines(path: str) -> dict:
    """{`charades-<VIDEOID>-<line>`: (line number, [start, end])} from a Charades-STA text file."""
    out = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            head, separator, _query = line.strip().partition("##")
            parts = head.split()
            if not separator or len(parts) != 3:
                raise ValueError(f"{path} line {line_number}: expected 'VIDEOID START END##query', got {line.strip()[:60]!r}.")
            try:
                span = [float(parts[1]), float(parts[2])]
            except ValueError as error:
                raise ValueError(f"{path} line {line_number}: times {parts[1:]} are not numbers.") from error
            out[f"charades-{parts[0]}-{line_number}"] = (line_number, span)
    if not out:
        raise ValueError(f"{path}: no annotation line.")
    return out


def _charades_top1(record: dict, path: str):
    if "pred_span" in record:
        return record["pred_span"] or None
    if "pred_relevant_windows" in record:
        windows = record["pred_relevant_windows"]
        return windows[0][:2] if windows else None
    raise ValueError(f"{path}: record {record.get('qid', record.get('id'))!r} has neither pred_span nor pred_relevant_windows.")


def evaluate_charades(args) -> dict:
    truths = read_charades_lines(args.ground_truth)
    by_line = {line: key for key, (line, _) in truths.items()}
    predicted = {}
    for index, record in enumerate(read_records(args.predictions)):
        key = record.get("qid", record.get("id"))
        if key is None and "line" in record:
            key = by_line.get(int(record["line"]), f"line {record['line']}")
        if key is None:
            raise ValueError(f"{args.predictions} record {index + 1}: no qid, id or line field.")
        if key in predicted:
            raise ValueError(f"{args.predictions} record {index + 1}: {key!r} appears twice.")
        predicted[key] = _charades_top1(record, args.predictions)
    _check_unknown(predicted, set(truths), args.predictions)
    _report_missing([k for k in truths if k not in predicted], "Charades-STA queries")
    return charades_metrics([predicted.get(k) for k in truths], [span for _, span in truths.values()])


def _read_refs(args) -> list[dict]:
    """The refs of `--refs`: JSON / JSONL records, parquet (the hub's exports too) or, with --allow-pickle, a
    REFER pickle read by the restricted unpickler of `tpo.processing.refcoco_sources`."""
    from tpo.processing.refcoco_sources import PICKLE_SUFFIXES, load_refs

    if Path(args.refs).suffix.lower() in (*PICKLE_SUFFIXES, ".parquet"):
        return load_refs(args.refs, allow_pickle=args.allow_pickle)
    return read_records(args.refs)


def _refcoco_ground_truth_from_coco(args) -> dict:
    """{`<dataset>-<ref_id>-<sentence index>-box`: GT box [x, y, w, h]} of the refs of one split."""
    refs = _read_refs(args)
    boxes = {}
    if any("_annotation" not in ref for ref in refs):
        if not args.instances:
            raise ValueError(f"{args.refs}: these refs point into a COCO instances file; give --instances.")
        coco = json.loads(Path(args.instances).read_text(encoding="utf-8"))
        boxes = {annotation["id"]: annotation.get("bbox") for annotation in coco["annotations"]}
    out = {}
    for ref in refs:
        if args.split and "split" in ref and ref.get("split") != args.split:
            continue
        box = ref["_annotation"].get("bbox") if "_annotation" in ref else boxes.get(ref["ann_id"])
        if box is None:
            raise ValueError(f"{args.refs}: ref {ref.get('ref_id')} points to annotation {ref.get('ann_id')}, which has "
                             f"no bbox in {args.instances or args.refs}.")
        for sentence_index, _ in enumerate(ref.get("sentences", [])):
            out[f"{args.dataset_name}-{ref['ref_id']}-{sentence_index}-box"] = box
    return out


def _predicted_box_xywh(record: dict):
    """The prediction as COCO [x, y, w, h] (as scored, like pycocotools), or None."""
    if record.get("bbox"):
        return list(record["bbox"])
    if record.get("bbox_xyxy"):
        return xyxy_to_xywh(record["bbox_xyxy"])[0].tolist()
    return None


def evaluate_refcoco(args) -> dict:
    if args.refs:
        truths = _refcoco_ground_truth_from_coco(args)
    elif args.ground_truth:
        truths = {key: record["bbox"] for key, record in _index(read_records(args.ground_truth), ("id",), args.ground_truth).items()}
    else:
        raise ValueError("refcoco needs --ground-truth, or --refs (with --instances unless the refs carry their boxes).")
    if not truths:
        raise ValueError("The ground truth has no expression (check --split).")
    predicted = {key: _predicted_box_xywh(r) for key, r in _index(read_records(args.predictions), ("id",), args.predictions).items()}
    _check_unknown(predicted, set(truths), args.predictions)
    _report_missing([k for k in truths if k not in predicted], "expressions")
    keys = list(truths)
    return refcoco_accuracy_xywh([predicted.get(k) for k in keys], [truths[k] for k in keys])


def read_reasonseg_folder(folder: str, all_texts: bool) -> dict:
    """{`reasonseg-<name>-<text index>`: (target mask, ignore mask)} from a ReasonSeg folder, the ground
    truth LISA's `get_mask_from_json` builds (`tpo.processing.reasonseg`) on the upright image size."""
    from tpo.processing.images import image_size
    from tpo.processing.reasonseg import IGNORE, TARGET, read_labelme_json, reasonseg_label_map

    out = {}
    for json_path in sorted(Path(folder).glob("*.json")):
        record = read_labelme_json(json_path)
        image_path = next((json_path.with_suffix(s) for s in (".jpg", ".png", ".jpeg") if json_path.with_suffix(s).exists()), None)
        if image_path is None:
            raise FileNotFoundError(f"{json_path}: no image next to it; ReasonSeg needs <name>.jpg beside <name>.json.")
        height, width = image_size(image_path)
        labels = reasonseg_label_map(record.get("shapes", []), height, width, str(json_path))
        texts = record.get("text", [])
        texts = [texts] if isinstance(texts, str) else list(texts)
        for index in range(len(texts) if all_texts else min(1, len(texts))):
            out[f"reasonseg-{json_path.stem}-{index}"] = (labels == TARGET, labels == IGNORE)
    if not out:
        raise ValueError(f"{folder}: no ReasonSeg json with text found.")
    return out


def _predicted_mask(record: dict):
    if record.get("mask"):
        return record["mask"]
    if record.get("masks"):
        return record["masks"][0]
    return None


def evaluate_reasonseg(args) -> dict:
    if Path(args.ground_truth).is_dir():
        truths = read_reasonseg_folder(args.ground_truth, args.all_texts)
    else:
        truths = {key: (r["mask"], r.get("ignore")) for key, r in _index(read_records(args.ground_truth), ("id",), args.ground_truth).items()}
    predicted = {key: _predicted_mask(r) for key, r in _index(read_records(args.predictions), ("id",), args.predictions).items()}
    unknown = [k for k in predicted if k not in truths]
    if unknown:  # other texts of an image are not evaluated without --all-texts; anything else is a naming error
        logger.warning("%d predicted id(s) are not evaluated (e.g. %s).", len(unknown), unknown[:3])
    _report_missing([k for k in truths if k not in predicted], "ReasonSeg samples")
    keys = list(truths)
    return mask_iou_metrics([predicted.get(k) for k in keys], [truths[k][0] for k in keys], [truths[k][1] for k in keys])


def read_mevis_ground_truth(meta_path: str, mask_dict_path: str, dataset_name: str) -> dict:
    """{`<dataset>-<video>-<expression>`: (frame names, per-frame merged masks)} from MeViS files."""
    meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    mask_dict = json.loads(Path(mask_dict_path).read_text(encoding="utf-8"))
    if "videos" not in meta:
        raise ValueError(f"{meta_path}: no 'videos' key; expected MeViS meta_expressions.json.")
    out = {}
    for video_id, video in meta["videos"].items():
        frames = video["frames"]
        for expression_id, expression in video["expressions"].items():
            anno_ids = [str(a) for a in expression.get("anno_id", expression.get("obj_id", []))]
            missing = [a for a in anno_ids if a not in mask_dict]
            if missing:
                raise ValueError(f"{mask_dict_path}: annotation(s) {missing} of {video_id}/{expression_id} are missing.")
            rles = [[mask_dict[a][f] for f in range(len(frames))] for a in anno_ids]
            size = next((r["size"] for per_frame in rles for r in per_frame if r), None)
            masks = []
            for f in range(len(frames)):
                merged = np.zeros(size or (1, 1), dtype=bool)
                for per_frame in rles:
                    if per_frame[f]:
                        merged |= as_mask(per_frame[f])
                masks.append(merged)
            out[f"{dataset_name}-{video_id}-{expression_id}"] = (video_id, expression_id, frames, masks)
    return out


def _read_png_predictions(folder: str, truths: dict) -> dict:
    from PIL import Image

    out = {}
    for key, (video_id, expression_id, frames, _masks) in truths.items():
        directory = Path(folder) / str(video_id) / str(expression_id)
        if not directory.is_dir():
            continue
        masks = []
        for frame in frames:
            png = directory / f"{Path(str(frame)).stem}.png"
            if png.exists():
                with Image.open(png) as image:
                    masks.append(np.asarray(image.convert("L")) > 0)
            else:
                masks.append(None)
        out[key] = masks
    return out


def evaluate_mevis(args) -> dict:
    if args.meta and args.mask_dict:
        truths = read_mevis_ground_truth(args.meta, args.mask_dict, args.dataset_name)
    elif args.ground_truth:
        records = _index(read_records(args.ground_truth), ("id",), args.ground_truth)
        truths = {key: (None, None, list(range(len(r["masks"]))), [m if m else None for m in r["masks"]]) for key, r in records.items()}
    else:
        raise ValueError("mevis needs --meta with --mask-dict, or --ground-truth.")
    if Path(args.predictions).is_dir():
        predicted = _read_png_predictions(args.predictions, truths)
    else:
        by_pair = {(str(v), str(e)): key for key, (v, e, _, _) in truths.items() if v is not None}
        predicted = {}
        for index, record in enumerate(read_records(args.predictions)):
            key = record.get("id") or by_pair.get((str(record.get("video_id")), str(record.get("exp_id"))))
            if key is None:
                raise ValueError(f"{args.predictions} record {index + 1}: no id, or video_id + exp_id not in the ground truth.")
            if key in predicted:
                raise ValueError(f"{args.predictions} record {index + 1}: expression {key!r} appears twice.")
            predicted[key] = record.get("masks") or []
        _check_unknown(predicted, set(truths), args.predictions)
    missing = [k for k in truths if k not in predicted]
    if missing:
        logger.warning("%d expression(s) have no prediction and score J = F = 0, as the MeViS evaluation scores a video "
                       "without predictions (e.g. %s).", len(missing), missing[:3])
    pred_videos, gt_videos = [], []
    for key, (_, _, frames, masks) in truths.items():
        gt = [np.zeros((1, 1), dtype=bool) if m is None else as_mask(m, f"{key} GT frame {i}") for i, m in enumerate(masks)]
        if key not in predicted:
            pred_videos.append(None)
            gt_videos.append(gt)
            continue
        pred = list(predicted[key])
        if len(pred) > len(frames):
            raise ValueError(f"{args.predictions}: {key} has {len(pred)} predicted frames for {len(frames)} GT frames.")
        pred += [None] * (len(frames) - len(pred))
        # A frame whose GT mask size is unknown (no object anywhere) takes the prediction's size.
        gt = [np.zeros(as_mask(p).shape, dtype=bool) if g.shape == (1, 1) and not g.any() and p is not None else g
              for g, p in zip(gt, pred)]
        pred_videos.append(pred)
        gt_videos.append(gt)
    return j_and_f(pred_videos, gt_videos)


def read_box_file(path: Path) -> np.ndarray:
    """`(n, 4)` boxes from a text file with one `x,y,w,h` a line (commas, tabs or spaces)."""
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        values = line.replace(",", " ").replace("\t", " ").split()
        try:
            rows.append([float(v) for v in values[:4]])
        except ValueError as error:
            raise ValueError(f"{path} line {line_number}: not numbers: {line.strip()!r}.") from error
        if len(rows[-1]) != 4:
            raise ValueError(f"{path} line {line_number}: expected x,y,w,h, got {line.strip()!r}.")
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def _flags(path: Path) -> np.ndarray:
    return np.array([int(float(v)) for v in path.read_text(encoding="utf-8").replace(",", " ").split()], dtype=np.int64)


def read_got10k_resolution(meta_path: Path) -> tuple[int, int]:
    """(width, height) from GOT-10k's `meta_info.ini` line `resolution: (1920, 1080)`."""
    for line in meta_path.read_text(encoding="utf-8").splitlines()[1:]:
        key, _, value = line.partition(": ")
        if key.strip() == "resolution":
            numbers = re.findall(r"\d+(?:\.\d+)?", value)
            if len(numbers) == 2:
                return int(float(numbers[0])), int(float(numbers[1]))
    raise ValueError(f"{meta_path}: no 'resolution: (width, height)' line.")


def _visibility(folder: Path, count: int) -> np.ndarray:
    """LaSOT: not full_occlusion and not out_of_view; GOT-10k: cover > 0 (the toolkit's rule; absence.label
    only when there is no cover.label)."""
    visible = np.ones(count, dtype=bool)
    for name in ("full_occlusion.txt", "out_of_view.txt"):
        if (folder / name).exists():
            visible &= _flags(folder / name)[:count] == 0
    if (folder / "cover.label").exists():
        visible &= _flags(folder / "cover.label")[:count] > 0
    elif (folder / "absence.label").exists():
        visible &= _flags(folder / "absence.label")[:count] == 0
    return visible


def _records_by_name(path: str, boxes_key: str) -> dict:
    """{name: record} of a tracking records file; a record without 'name' or `boxes_key`, or a name given twice,
    is refused with its record number."""
    out = {}
    for index, record in enumerate(read_records(path)):
        name = record.get("name")
        if name is None or boxes_key not in record:
            raise ValueError(f"{path} record {index + 1}: needs 'name' and {boxes_key!r}.")
        if name in out:
            raise ValueError(f"{path} record {index + 1}: sequence {name!r} appears twice.")
        out[name] = record
    return out


def read_tracking_ground_truth(root: str) -> dict:
    """{sequence: TrackingSequence without predictions} from a LaSOT / GOT-10k folder or records file."""
    root_path = Path(root)
    if root_path.is_file():
        return {name: TrackingSequence(None, np.asarray(record["gt_xywh"], dtype=np.float64).reshape(-1, 4),
                                       record.get("visible"), record.get("resolution"), str(name))
                for name, record in _records_by_name(root, "gt_xywh").items()}
    out = {}
    for gt_path in sorted(root_path.rglob("groundtruth.txt")):
        folder = gt_path.parent
        if folder.name in out:
            raise ValueError(f"{root}: two sequences are named {folder.name!r} ({gt_path}); names must be unique.")
        boxes = read_box_file(gt_path)
        resolution = read_got10k_resolution(folder / "meta_info.ini") if (folder / "meta_info.ini").exists() else None
        out[folder.name] = TrackingSequence(None, boxes, _visibility(folder, len(boxes)), resolution, folder.name)
    if not out:
        raise ValueError(f"{root}: no <sequence>/groundtruth.txt found.")
    return out


def _run_files(source: Path, name: str) -> list[Path]:
    """A sequence's result files: LaSOT's `<name>.txt`, else every GOT-10k run `<name>/<name>_NNN.txt`."""
    if (source / f"{name}.txt").exists():
        return [source / f"{name}.txt"]
    return sorted(p for p in (source / name).glob(f"{name}_[0-9]*.txt") if re.fullmatch(rf"{re.escape(name)}_\d+\.txt", p.name))


def read_tracking_predictions(path: str, names: list) -> dict:
    """{sequence: `(runs, n, 4)` boxes} from a records file or a results folder. Records naming no GT
    sequence, or one twice, are refused; result files of no GT sequence are reported."""
    source = Path(path)
    if source.is_file():
        out = {}
        for name, record in _records_by_name(path, "pred_xywh").items():
            boxes = np.asarray(record["pred_xywh"], dtype=np.float64)
            out[name] = boxes.reshape(-1, boxes.shape[-2], 4) if boxes.ndim == 3 else boxes.reshape(1, -1, 4)
        _check_unknown(out, set(names), path)
        return out
    out = {}
    for name in names:
        files = _run_files(source, name)
        if files:
            runs = [read_box_file(f) for f in files]
            if len({len(r) for r in runs}) > 1:
                raise ValueError(f"{source / name}: its runs have {[len(r) for r in runs]} boxes; every run needs one box "
                                 f"per frame.")
            out[name] = np.stack(runs)
    known = set(names)
    unknown = sorted(p.stem for p in source.glob("*.txt") if p.stem not in known and not p.stem.endswith("_time"))
    unknown += sorted(p.name for p in source.iterdir() if p.is_dir() and p.name not in known)
    if unknown:
        logger.warning("%s: %d result file(s)/folder(s) name no ground-truth sequence and are not scored (e.g. %s).",
                       path, len(unknown), unknown[:3])
    return out


def evaluate_tracking(args) -> dict:
    truths = read_tracking_ground_truth(args.ground_truth)
    predicted = read_tracking_predictions(args.predictions, list(truths))
    missing = [name for name in truths if name not in predicted]
    if missing:
        raise ValueError(f"{args.predictions}: no prediction for {len(missing)} sequence(s) (e.g. {missing[:3]}); "
                         f"the tracking protocols need every sequence.")
    sequences = [TrackingSequence(predicted[name], truth.gt_xywh, truth.visible, truth.resolution_wh, name)
                 for name, truth in truths.items()]
    metrics = {}
    if args.protocol in ("lasot", "both"):
        several = [s.name for s in sequences if len(s.pred_xywh) > 1]
        if several:
            logger.info("LaSOT scores run 1 of the %d sequence(s) with several runs (e.g. %s).", len(several), several[:3])
        metrics.update(lasot_metrics([TrackingSequence(s.pred_xywh[:1], s.gt_xywh, s.visible, None, s.name)
                                      for s in sequences]))
    if args.protocol in ("got10k", "both"):
        metrics.update(got10k_metrics(sequences))
    return metrics


def _answer_and_options(record: dict):
    if "candidates" in record:  # MVBench: the answer is the text of a candidate
        options = list(record["candidates"])
        if record["answer"] not in options:
            raise ValueError(f"MVBench row {record.get('id', '?')}: answer {record['answer']!r} is not a candidate.")
        return options.index(record["answer"]), options
    return record["answer"], record.get("options")


def _string_keys(indexed: dict) -> dict:
    """Ids compared as strings (a LLaVA id 5 and the reader's "llava-5" -> "5" are the same question)."""
    return {str(k): v for k, v in indexed.items()}


def evaluate_mcqa(args) -> dict:
    gt_records = read_records(args.ground_truth)
    pred_records = read_records(args.predictions)
    with_ids = all("id" in r for r in gt_records)
    truths = _string_keys(_index(gt_records, ("id",), args.ground_truth) if with_ids else dict(enumerate(gt_records)))
    predicted = _string_keys({k: r.get("prediction") for k, r in _index(pred_records, ("id",), args.predictions).items()}
                             if with_ids else {i: r.get("prediction") for i, r in enumerate(pred_records)})
    open_ended = {k for k, r in truths.items() if "answer" not in r}
    if open_ended:  # a LLaVA file mixes open questions (no answer letter) with multiple-choice ones
        logger.info("%d ground-truth record(s) without an answer (open-ended) are not evaluated (e.g. %s).",
                    len(open_ended), sorted(open_ended)[:3])
        truths = {k: r for k, r in truths.items() if k not in open_ended}
        predicted = {k: v for k, v in predicted.items() if k not in open_ended}
    if not truths:
        raise ValueError(f"{args.ground_truth}: no record with an answer; nothing to evaluate.")
    _check_unknown(predicted, set(truths), args.predictions)
    _report_missing([k for k in truths if k not in predicted], "questions")
    keys = list(truths)
    answers, options = zip(*(_answer_and_options(truths[k]) for k in keys))
    group_field = next((f for f in ("task_type", "question_type", "group") if all(f in truths[k] for k in keys)), None)
    groups = [str(truths[k][group_field]) for k in keys] if group_field else None
    return mcqa_accuracy([predicted.get(k) for k in keys], list(answers), list(options), groups,
                         convention=args.convention)


# ----------------------------------------------------------------------------------------------------
# predict: a TPO checkpoint over a dataset -> prediction files in the formats read above
# ----------------------------------------------------------------------------------------------------

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

    from tpo.processing.processing_tpo import TPOProcessor

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
    from tpo.training.script_inputs import read_yaml_document

    source = Path(path)
    data = read_yaml_document(source, "--data (a YAML or JSON file of reader specs, see predict --help)")
    if isinstance(data, dict) and isinstance(data.get("splits"), dict):  # the synthetic manifest
        from tpo.processing.synthetic import resolve_manifest

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
    from tpo.processing.pipeline import probe_media
    from tpo.processing.schema import rle_from_mask

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
    from tpo.processing.readers import read_spec

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


def _safe_name(text: str) -> str:
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


def _evaluate_arguments(group: dict, spec: dict, path: str, ground_truth_path: str | None) -> tuple[list | None, str | None]:
    """The arguments of this script that evaluate `path`, and a note (why none, or what to know)."""
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


def write_benchmark_predictions(predictions, entries: dict, specs: list[dict], output_dir: str) -> list[dict]:
    """One file per (source, split, kind) in the formats the subcommands read; returns their descriptions."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for (source, split, kind), group in sorted(_prediction_records(predictions, entries).items()):
        path = root / f"{_safe_name(source)}_{_safe_name(split)}_{kind}"
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
            "command": shlex.join([Path(sys.executable).name, str(Path(__file__)), *arguments]) if arguments else None,
            "note": note,
        })
        logger.info("Wrote %s (%d records)", path, len(group["records"]))
    return files


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
    from tpo.visualization import render_record

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
            path = folder / f"{_safe_name(prediction['id'])}.png"
            try:
                render_record(kind, record).save(path, format="PNG")
            except (OSError, ValueError) as error:
                logger.warning("Cannot draw %r: %s", prediction["id"], error)
                continue
            path.with_suffix(".json").write_text(json.dumps(record), encoding="utf-8")
            written.append(str(path))
            done += 1
    return written


def _annotated_only(predictions, entries: dict):
    from tpo.training.evaluation import Predictions

    def keep(items):
        return [p for p in items if entries[p["id"]]["annotated"]]

    return Predictions(router=list(predictions.router), routing=keep(predictions.routing),
                       temporal=keep(predictions.temporal), region=keep(predictions.region),
                       mask=keep(predictions.mask), text=keep(predictions.text))


def _predict_benchmarks(args, model, processor, specs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Multiple-choice and tracking specs (issue 17), run by `tpo.training.benchmark_predict`: (the other specs,
    their file descriptions with the command that scores each)."""
    from tpo.training.benchmark_predict import predict_benchmark_specs
    from tpo.training.tracking import TrackingConfig

    tracking = TrackingConfig(first_frame=args.tracking_first_frame, lost_target=args.tracking_lost_target)
    specs, files = predict_benchmark_specs(model, processor, specs, args.output_dir, batch_size=args.batch_size,
                                           max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
                                           tracking=tracking)
    for entry in files:
        arguments = entry["evaluate"]
        entry["command"] = shlex.join([Path(sys.executable).name, str(Path(__file__)), *arguments]) if arguments else None
        if args.evaluate and arguments:  # the subcommand's own numbers, as fractions like the task metrics
            scoring = build_parser().parse_args(arguments)
            entry["metrics"] = {k: v / 100 for k, v in scoring.handler(scoring).items() if isinstance(v, float)}
    return specs, files


def predict(args) -> dict:
    from tpo.processing.pipeline import evenly_spaced_mask_frames
    from tpo.training.evaluation import TaskEvaluator, compute_task_metrics, format_table

    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise ValueError("--batch-size and --max-samples must be at least 1.")
    specs = read_data_specs(args.data, args.split)
    model, processor = load_tpo_checkpoint(args.model, args.processor, args.device, args.dtype)
    logger.info("Model %s: tasks %s, on %s (%s)", args.model, list(model.config.tasks), next(model.parameters()).device,
                next(model.parameters()).dtype)
    specs, benchmark_files = _predict_benchmarks(args, model, processor, specs)
    entries = read_prediction_samples(specs, model.config.tasks, args.max_samples) if specs else []
    if not entries and not benchmark_files:
        raise ValueError(f"{args.data}: no sample to predict (see the warnings above).")
    for entry in entries:
        entry["format"] = specs[entry["spec"]]["format"]
    if args.mask_frames_per_video < 0:
        raise ValueError("--mask-frames-per-video must be 0 (every annotated frame) or more.")
    for entry in entries:  # evaluation scores every annotated frame unless asked for fewer
        entry["sample"] = evenly_spaced_mask_frames(entry["sample"], args.mask_frames_per_video)
    by_id = {entry["sample"]["id"]: entry for entry in entries}
    evaluator = TaskEvaluator(processor, [e["sample"] for e in entries], batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, mask_video_mode=args.mask_video_mode)
    predictions = evaluator.predict(model)
    predicted = {p["id"] for task in ("temporal", "region", "mask", "text") for p in getattr(predictions, task)}
    missing = [i for i in by_id if i not in predicted]
    if missing:
        logger.warning("%d sample(s) have no prediction (e.g. %s); see the warnings above.", len(missing), missing[:3])
    output_dir = Path(args.output_dir)
    summary = {"model": args.model, "data": args.data, "split": args.split, "samples": len(entries),
               "predicted": len(predicted), "annotated": sum(e["annotated"] for e in entries),
               "files": write_benchmark_predictions(predictions, by_id, specs, str(output_dir)) + benchmark_files}
    if args.visualize:
        summary["visualizations"] = write_visualizations(predictions, by_id, str(output_dir), args.visualize)
    if args.evaluate:
        metrics = compute_task_metrics(_annotated_only(predictions, by_id))
        metrics.update({f"{f['source']}/{k}": v for f in benchmark_files for k, v in f.get("metrics", {}).items()})
        if not metrics:
            logger.warning("No annotated sample was predicted: no metrics.")
        summary["metrics"] = metrics
        (output_dir / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
        logger.info("Task metrics on %d annotated samples:\n%s", summary["annotated"], format_table(metrics))
    (output_dir / "predict_summary.json").write_text(json.dumps(_json_ready(summary), indent=2) + "\n", encoding="utf-8")
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, ground_truth_required: bool = True) -> None:
    parser.add_argument("--predictions", required=True, help="predictions file (or folder, where documented)")
    parser.add_argument("--ground-truth", required=ground_truth_required, help="ground-truth file or folder")
    parser.add_argument("--output", help="write the metrics JSON here as well")


def _section(name: str) -> str:
    """This benchmark's paragraph of the module docstring, for its --help."""
    lines = __doc__.splitlines()
    start = lines.index(name) + 1
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return textwrap.dedent("\n".join(lines[start:end]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", required=True)

    def add(name: str, handler, ground_truth_required: bool = True) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, description=_section(name), formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(sub, ground_truth_required)
        sub.set_defaults(handler=handler)
        return sub

    add("qvhighlights", evaluate_qvhighlights).add_argument(
        "--on-missing", choices=("error", "wrong", "drop"), default="error",
        help="qids on one side only: error (official), wrong (count as no prediction), drop (shared qids only)")
    add("charades", evaluate_charades)
    refcoco = add("refcoco", evaluate_refcoco, ground_truth_required=False)
    refcoco.add_argument("--instances", help="COCO instances json (with --refs)")
    refcoco.add_argument("--refs", help="refs as JSON (list or jsonl) or parquet (the hub's exports need no "
                                        "--instances), or a REFER pickle with --allow-pickle")
    refcoco.add_argument("--allow-pickle", action="store_true",
                         help="read a REFER refs(unc).p pickle with a restricted unpickler (plain data only)")
    refcoco.add_argument("--split", help="refs split to evaluate (val, testA, ...)")
    refcoco.add_argument("--dataset-name", default="refcoco", help="id prefix, as given to the RefCOCO reader")
    add("reasonseg", evaluate_reasonseg).add_argument(
        "--all-texts", action="store_true", help="evaluate every text of an image (LISA evaluates text 0 only)")
    mevis = add("mevis", evaluate_mevis, ground_truth_required=False)
    mevis.add_argument("--meta", help="meta_expressions.json (with --mask-dict)")
    mevis.add_argument("--mask-dict", help="mask_dict.json")
    mevis.add_argument("--dataset-name", default="mevis", help="id prefix, as given to the MeViS reader")
    add("tracking", evaluate_tracking).add_argument("--protocol", choices=("lasot", "got10k", "both"), default="both")
    add("mcqa", evaluate_mcqa).add_argument(
        "--convention", choices=tuple(ANSWER_CONVENTIONS), default="tpo",
        help="how answers are read: tpo (default) or lmms-eval (its MVBench reading: lowercase letters and lone "
             "letters in sentences count, empty answers leave the denominator; see tpo.training.metrics.mcqa)")

    run = subparsers.add_parser("predict", description=_section("predict"), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True, help="TPO checkpoint folder (save_pretrained), e.g. <run_tpo output_dir>/final")
    run.add_argument("--processor", help="folder of the saved TPOProcessor (default: --model)")
    run.add_argument("--data", required=True, help="YAML/JSON file of reader specs: a list, {split: [specs]}, or a synthetic manifest.json")
    run.add_argument("--split", default="test", help="split of a {split: [specs]} file or manifest (default: test)")
    run.add_argument("--output-dir", required=True, help="folder for the prediction files, predict_summary.json, metrics.json")
    run.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default: 8)")
    run.add_argument("--max-samples", type=int, help="at most this many samples per spec")
    run.add_argument("--max-new-tokens", type=int, default=16, help="answer length for conversation samples (default: 16)")
    run.add_argument("--mask-frames-per-video", type=int, default=0, metavar="N",
                     help="video mask samples: segment N evenly spaced annotated frames (default 0: all of them)")
    run.add_argument("--mask-video-mode", choices=("propagate", "per_frame"), default="propagate",
                     help="video masks: first frame by the mask head, then SAM2's video memory (propagate, default), "
                          "or every frame prompted alone (per_frame: for a SAM2 whose memory is untrained)")
    run.add_argument("--tracking-first-frame", choices=("mask_head", "sam2_box"), default="mask_head",
                     help="tracking specs: frame 0 segmented by the mask head (MLLM task embedding + the first box as "
                          "its box prompt, default) or by SAM2's box prompt alone")
    run.add_argument("--tracking-lost-target", choices=("previous", "zeros"), default="previous",
                     help="tracking specs: box written for a frame whose mask is empty (default: the previous box)")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    run.add_argument("--evaluate", action="store_true", help="also compute the task metrics on the annotated samples")
    run.add_argument("--visualize", type=int, default=0, metavar="K", help="write K PNGs per task under visualizations/")
    run.set_defaults(handler=predict)
    return parser


def _json_ready(value):
    """NaN (a metric with nothing to average) -> null, so the output is standard JSON."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    metrics = _json_ready(args.handler(args))
    text = json.dumps(metrics, indent=2)
    print(text)
    if getattr(args, "output", None):
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        sys.exit(1)
