"""Evaluate predictions against benchmark ground truth with the official metrics; prints the metrics JSON
and writes it with `--output`.

    python examples/evaluate_tpo.py qvhighlights --predictions preds.jsonl --ground-truth highlight_val_release.jsonl --output metrics.json
    python examples/evaluate_tpo.py charades --predictions preds.jsonl --ground-truth charades_sta_test.txt
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --ground-truth refcoco_val.jsonl
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --instances instances.json --refs refs.json --split val
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
    ground truth: records `{"id", "bbox": [x, y, w, h]}`, or `--instances` (COCO instances json) with `--refs`
    (a JSON export of the refs: `ref_id`, `ann_id`, `split`, `sentences`) and `--split`, giving the ids
    `<dataset>-<ref_id>-<sentence index>-box` of the RefCOCO reader. A missing box is wrong.
    Output: Acc@0.5, mIoU (%).
reasonseg
    predictions: records `{"id", "mask": RLE}` (or `"masks": [RLE, ...]`, the first is used).
    ground truth: the ReasonSeg folder (`<name>.jpg` + `<name>.json` with polygon `shapes` and `text`; ids
    `reasonseg-<name>-<text index>`; polygons painted largest first, "ignore" shapes left out of I and U, as
    LISA does; only text 0 of each image is evaluated, as LISA's validation does, unless `--all-texts`), or
    records `{"id", "mask": RLE, "ignore": RLE (optional)}`. A missing mask is empty. Output: gIoU, cIoU (%).
mevis
    ground truth: `--meta meta_expressions.json` and `--mask-dict mask_dict.json` (MeViS / Ref-YouTube-VOS
    layout; the masks of all `anno_id`s of an expression are merged; ids `<dataset>-<video>-<expression>`)
    or `--ground-truth` records `{"id", "masks": [RLE or null per frame]}`. Predictions: records
    `{"id", "masks": [RLE or null per frame]}` (or `video_id` + `exp_id` instead of `id`), or the official
    submission folder `<dir>/<video>/<expression>/<frame>.png` (pixels > 0 are the mask). A missing frame is
    an empty mask. Output: J, F, J&F (%).
tracking
    ground truth: a LaSOT or GOT-10k folder, searched for `<sequence>/groundtruth.txt` (x,y,w,h a line);
    visibility from `full_occlusion.txt` + `out_of_view.txt` (LaSOT) or `absence.label` / `cover.label`
    (GOT-10k), or records `{"name", "gt_xywh": [[x, y, w, h], ...], "visible": [...] (optional)}`.
    Predictions: a folder of `<sequence>.txt` (or GOT-10k's `<sequence>/<sequence>_001.txt`), or records
    `{"name", "pred_xywh": [...]}`. `--protocol lasot|got10k|both`. Every sequence needs a prediction.
    Output: success_auc, precision@20, normalized_precision (LaSOT); AO, SR0.5, SR0.75 (GOT-10k) (%).
mcqa
    predictions: records `{"id", "prediction": "free text"}`; ground truth: records `{"id", "answer",
    "options": [...] (optional)}` where `answer` is a letter, or MVBench rows `{"candidates": [...], "answer":
    "<candidate text>"}` (ids default to the row index when absent on both sides); an optional `task_type`
    (or `question_type`, `group`) adds per-task accuracy and their mean. A missing answer is wrong.
    Output: accuracy, unparsed (%), accuracy/<task>, mean_group_accuracy.
"""

import argparse
import json
import logging
import math
import sys
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
    refcoco_accuracy,
    tracking_metrics,
    xywh_to_xyxy,
)

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


def _refcoco_ground_truth_from_coco(args) -> dict:
    coco = json.loads(Path(args.instances).read_text(encoding="utf-8"))
    boxes = {annotation["id"]: annotation["bbox"] for annotation in coco["annotations"]}
    out = {}
    for ref in read_records(args.refs):
        if args.split and ref.get("split") != args.split:
            continue
        if ref["ann_id"] not in boxes:
            raise ValueError(f"{args.refs}: ref {ref.get('ref_id')} points to annotation {ref['ann_id']}, not in {args.instances}.")
        for sentence_index, _ in enumerate(ref.get("sentences", [])):
            out[f"{args.dataset_name}-{ref['ref_id']}-{sentence_index}-box"] = boxes[ref["ann_id"]]
    return out


def _predicted_box_xyxy(record: dict):
    if record.get("bbox_xyxy"):
        return list(record["bbox_xyxy"])
    if record.get("bbox"):
        return xywh_to_xyxy(record["bbox"])[0].tolist()
    return None


def evaluate_refcoco(args) -> dict:
    if args.instances and args.refs:
        truths = _refcoco_ground_truth_from_coco(args)
    elif args.ground_truth:
        truths = {key: record["bbox"] for key, record in _index(read_records(args.ground_truth), ("id",), args.ground_truth).items()}
    else:
        raise ValueError("refcoco needs --ground-truth, or --instances with --refs.")
    if not truths:
        raise ValueError("The ground truth has no expression (check --split).")
    predicted = {key: _predicted_box_xyxy(r) for key, r in _index(read_records(args.predictions), ("id",), args.predictions).items()}
    _check_unknown(predicted, set(truths), args.predictions)
    _report_missing([k for k in truths if k not in predicted], "expressions")
    keys = list(truths)
    return refcoco_accuracy([predicted.get(k) for k in keys], xywh_to_xyxy([truths[k] for k in keys]))


def _polygon_mask(points: list, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    flat = [float(v) for point in points for v in point[:2]]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([flat], height, width))).astype(bool)


def read_reasonseg_folder(folder: str, all_texts: bool) -> dict:
    """{`reasonseg-<name>-<text index>`: (target mask, ignore mask)} from a ReasonSeg folder."""
    from PIL import Image

    out = {}
    for json_path in sorted(Path(folder).glob("*.json")):
        record = json.loads(json_path.read_text(encoding="utf-8"))
        image_path = next((json_path.with_suffix(s) for s in (".jpg", ".png", ".jpeg") if json_path.with_suffix(s).exists()), None)
        if image_path is None:
            raise FileNotFoundError(f"{json_path}: no image next to it; ReasonSeg needs <name>.jpg beside <name>.json.")
        with Image.open(image_path) as image:
            width, height = image.size
        shapes = [s for s in record.get("shapes", []) if s.get("label", "").lower() != "flag" and len(s.get("points", [])) >= 3]
        painted = [(_polygon_mask(s["points"], height, width), "ignore" in s.get("label", "").lower()) for s in shapes]
        labels = np.zeros((height, width), dtype=np.uint8)  # 0 background, 1 target, 2 ignore
        for mask, is_ignore in sorted(painted, key=lambda item: -int(item[0].sum())):  # largest first, as LISA
            labels[mask] = 2 if is_ignore else 1
        texts = record.get("text", [])
        texts = [texts] if isinstance(texts, str) else list(texts)
        for index in range(len(texts) if all_texts else min(1, len(texts))):
            out[f"reasonseg-{json_path.stem}-{index}"] = (labels == 1, labels == 2)
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
            predicted[key] = record.get("masks") or []
        _check_unknown(predicted, set(truths), args.predictions)
    _report_missing([k for k in truths if k not in predicted], "expressions")
    pred_videos, gt_videos = [], []
    for key, (_, _, frames, masks) in truths.items():
        gt = [np.zeros((1, 1), dtype=bool) if m is None else as_mask(m) for m in masks]
        pred = list(predicted.get(key, []))
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


def read_tracking_ground_truth(root: str) -> dict:
    """{sequence: (gt_xywh (n, 4), visible (n,))} from a LaSOT / GOT-10k folder or records file."""
    root_path = Path(root)
    if root_path.is_file():
        return {r["name"]: (np.asarray(r["gt_xywh"], dtype=np.float64).reshape(-1, 4), r.get("visible"))
                for r in read_records(root)}
    out = {}
    for gt_path in sorted(root_path.rglob("groundtruth.txt")):
        folder = gt_path.parent
        boxes = read_box_file(gt_path)
        visible = np.ones(len(boxes), dtype=bool)
        if (folder / "full_occlusion.txt").exists():
            visible &= _flags(folder / "full_occlusion.txt")[: len(boxes)] == 0
        if (folder / "out_of_view.txt").exists():
            visible &= _flags(folder / "out_of_view.txt")[: len(boxes)] == 0
        if (folder / "absence.label").exists():
            visible &= _flags(folder / "absence.label")[: len(boxes)] == 0
        elif (folder / "cover.label").exists():
            visible &= _flags(folder / "cover.label")[: len(boxes)] > 0
        out[folder.name] = (boxes, visible)
    if not out:
        raise ValueError(f"{root}: no <sequence>/groundtruth.txt found.")
    return out


def read_tracking_predictions(path: str, names: list) -> dict:
    source = Path(path)
    if source.is_file():
        return {r["name"]: np.asarray(r["pred_xywh"], dtype=np.float64).reshape(-1, 4) for r in read_records(path)}
    out = {}
    for name in names:
        candidates = [source / f"{name}.txt", source / name / f"{name}_001.txt"]
        found = next((c for c in candidates if c.exists()), None)
        if found is not None:
            out[name] = read_box_file(found)
    return out


def evaluate_tracking(args) -> dict:
    truths = read_tracking_ground_truth(args.ground_truth)
    predicted = read_tracking_predictions(args.predictions, list(truths))
    missing = [name for name in truths if name not in predicted]
    if missing:
        raise ValueError(f"{args.predictions}: no prediction for {len(missing)} sequence(s) (e.g. {missing[:3]}); "
                         f"the tracking protocols need every sequence.")
    sequences = []
    for name, (gt, visible) in truths.items():
        pred = predicted[name]
        if len(pred) != len(gt):
            raise ValueError(f"{args.predictions}: sequence {name} has {len(pred)} predicted boxes for {len(gt)} frames.")
        sequences.append((pred, gt, visible))
    protocol = {"lasot": lasot_metrics, "got10k": got10k_metrics, "both": tracking_metrics}[args.protocol]
    return protocol(sequences)


def _answer_and_options(record: dict):
    if "candidates" in record:  # MVBench: the answer is the text of a candidate
        options = list(record["candidates"])
        if record["answer"] not in options:
            raise ValueError(f"MVBench row {record.get('id', '?')}: answer {record['answer']!r} is not a candidate.")
        return options.index(record["answer"]), options
    return record["answer"], record.get("options")


def evaluate_mcqa(args) -> dict:
    gt_records = read_records(args.ground_truth)
    pred_records = read_records(args.predictions)
    with_ids = all("id" in r for r in gt_records)
    truths = _index(gt_records, ("id",), args.ground_truth) if with_ids else dict(enumerate(gt_records))
    predicted = ({k: r.get("prediction") for k, r in _index(pred_records, ("id",), args.predictions).items()} if with_ids
                 else {i: r.get("prediction") for i, r in enumerate(pred_records)})
    _check_unknown(predicted, set(truths), args.predictions)
    _report_missing([k for k in truths if k not in predicted], "questions")
    keys = list(truths)
    answers, options = zip(*(_answer_and_options(truths[k]) for k in keys))
    group_field = next((f for f in ("task_type", "question_type", "group") if all(f in truths[k] for k in keys)), None)
    groups = [str(truths[k][group_field]) for k in keys] if group_field else None
    return mcqa_accuracy([predicted.get(k) for k in keys], list(answers), list(options), groups)


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
    return "\n".join(line.strip() for line in lines[start:end])


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
    refcoco.add_argument("--refs", help="refs as JSON (list or jsonl), with --instances")
    refcoco.add_argument("--split", help="refs split to evaluate (val, testA, ...)")
    refcoco.add_argument("--dataset-name", default="refcoco", help="id prefix, as given to the RefCOCO reader")
    add("reasonseg", evaluate_reasonseg).add_argument(
        "--all-texts", action="store_true", help="evaluate every text of an image (LISA evaluates text 0 only)")
    mevis = add("mevis", evaluate_mevis, ground_truth_required=False)
    mevis.add_argument("--meta", help="meta_expressions.json (with --mask-dict)")
    mevis.add_argument("--mask-dict", help="mask_dict.json")
    mevis.add_argument("--dataset-name", default="mevis", help="id prefix, as given to the MeViS reader")
    add("tracking", evaluate_tracking).add_argument("--protocol", choices=("lasot", "got10k", "both"), default="both")
    add("mcqa", evaluate_mcqa)
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
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        sys.exit(1)
