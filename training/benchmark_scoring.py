"""Scoring of benchmark prediction files with the official metrics (`tpo.training.metrics`): the readers of
each benchmark's ground truth and of prediction files, and one `score_<benchmark>` function per benchmark
that `examples/evaluate_tpo.py <benchmark>` calls. Each function's docstring gives the file formats; the
README's evaluation section gives the commands. The command's flags are these functions' arguments
(`--ground-truth` is `ground_truth`, ...), so docstrings and errors name the flags.

A "records" file is a `.jsonl` file (one JSON object a line) or a `.json` file holding a list of objects.
Boxes are pixels; masks are COCO RLE `{"size": [H, W], "counts": "<string>"}`; spans are seconds.
This module imports neither torch nor transformers (a scoring command pays only for numpy and the metrics).
"""

import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from .metrics import (
    as_mask,
    charades_metrics,
    got10k_metrics,
    j_and_f,
    lasot_metrics,
    mask_iou_metrics,
    mcqa_accuracy,
    qvhighlights_eval,
    refcoco_accuracy_xywh,
    xyxy_to_xywh,
)
from .metrics.tracking import TrackingSequence

logger = logging.getLogger(__name__)


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


def score_qvhighlights(predictions: str, ground_truth: str, on_missing: str = "error") -> dict:
    """The official QVHighlights metrics of a submission file (`qvhighlights_eval`).

    predictions: the official submission jsonl, `{"qid", "pred_relevant_windows": [[start, end, score], ...],
    "pred_saliency_scores": [one per 2-second clip]}`; ground truth: QVHighlights jsonl, `{"qid", "duration",
    "relevant_windows": [[start, end]], "relevant_clip_ids", "saliency_scores": [[a1, a2, a3]]}`. Output: the
    official structure (`brief` with `MR-full-R1@0.5`, `MR-full-mAP`, `HL-min-VeryGood-mAP`, ..., then the
    per-range and per-level details), x100, 2 decimals. `--on-missing`: error (official) | wrong | drop.
    """
    return qvhighlights_eval(read_records(predictions), read_records(ground_truth), on_missing=on_missing)


def read_charades_lines(path: str) -> dict:
    """{`charades-<VIDEOID>-<line>`: (1-based line number, [start, end] in seconds)} from a Charades-STA text
    file (lines `VIDEOID START END##query`; blank lines are skipped but counted)."""
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


def score_charades(predictions: str, ground_truth: str) -> dict:
    """Top-1 moment retrieval on Charades-STA (`charades_metrics`).

    ground truth: the Charades-STA text file, lines `VIDEOID START END##query`. Predictions: records with
    `qid` (or `id`) = `charades-<VIDEOID>-<line number>` (1-based line of the text file, the id of
    `tpo.processing.readers.read_charades_sta`) or `line` = the line number, and either
    `pred_relevant_windows` [[start, end, score], ...] (the first is the top-1) or `pred_span` [start, end].
    A line without prediction counts as IoU 0. Output: R1@0.3, R1@0.5, R1@0.7, mIoU (%).
    """
    truths = read_charades_lines(ground_truth)
    by_line = {line: key for key, (line, _) in truths.items()}
    predicted = {}
    for index, record in enumerate(read_records(predictions)):
        key = record.get("qid", record.get("id"))
        if key is None and "line" in record:
            key = by_line.get(int(record["line"]), f"line {record['line']}")
        if key is None:
            raise ValueError(f"{predictions} record {index + 1}: no qid, id or line field.")
        if key in predicted:
            raise ValueError(f"{predictions} record {index + 1}: {key!r} appears twice.")
        predicted[key] = _charades_top1(record, predictions)
    _check_unknown(predicted, set(truths), predictions)
    _report_missing([k for k in truths if k not in predicted], "Charades-STA queries")
    return charades_metrics([predicted.get(k) for k in truths], [span for _, span in truths.values()])


def _read_refs(refs: str, allow_pickle: bool) -> list[dict]:
    """The refs file: JSON / JSONL records, parquet (the hub's exports too) or, with `allow_pickle`, a REFER
    pickle read by the restricted unpickler of `tpo.processing.refcoco_sources`."""
    from ..processing.refcoco_sources import PICKLE_SUFFIXES, load_refs

    if Path(refs).suffix.lower() in (*PICKLE_SUFFIXES, ".parquet"):
        return load_refs(refs, allow_pickle=allow_pickle)
    return read_records(refs)


def read_refcoco_ground_truth(refs: str, instances: str | None = None, split: str | None = None,
                              dataset_name: str = "refcoco", allow_pickle: bool = False) -> dict:
    """{`<dataset_name>-<ref_id>-<sentence index>-box`: GT box [x, y, w, h] in pixels} of the refs of `split`
    (every ref when None), the ids of the RefCOCO reader. `instances` (COCO instances json) gives the boxes of
    refs that do not carry their own (`_annotation`, the hub's parquet exports)."""
    records = _read_refs(refs, allow_pickle)
    boxes = {}
    if any("_annotation" not in ref for ref in records):
        if not instances:
            raise ValueError(f"{refs}: these refs point into a COCO instances file; give --instances.")
        coco = json.loads(Path(instances).read_text(encoding="utf-8"))
        boxes = {annotation["id"]: annotation.get("bbox") for annotation in coco["annotations"]}
    out = {}
    for ref in records:
        if split and "split" in ref and ref.get("split") != split:
            continue
        box = ref["_annotation"].get("bbox") if "_annotation" in ref else boxes.get(ref["ann_id"])
        if box is None:
            raise ValueError(f"{refs}: ref {ref.get('ref_id')} points to annotation {ref.get('ann_id')}, which has "
                             f"no bbox in {instances or refs}.")
        for sentence_index, _ in enumerate(ref.get("sentences", [])):
            out[f"{dataset_name}-{ref['ref_id']}-{sentence_index}-box"] = box
    return out


def _predicted_box_xywh(record: dict):
    """The prediction as COCO [x, y, w, h] (as scored, like pycocotools), or None."""
    if record.get("bbox"):
        return list(record["bbox"])
    if record.get("bbox_xyxy"):
        return xyxy_to_xywh(record["bbox_xyxy"])[0].tolist()
    return None


def score_refcoco(predictions: str, ground_truth: str | None = None, refs: str | None = None,
                  instances: str | None = None, split: str | None = None, dataset_name: str = "refcoco",
                  allow_pickle: bool = False) -> dict:
    """Referring-expression boxes (`refcoco_accuracy_xywh`); the ground truth is `ground_truth` records or
    `refs` (with `instances`, `split`, `dataset_name`, `allow_pickle`).

    predictions: records `{"id", "bbox": [x, y, w, h]}` (COCO) or `{"id", "bbox_xyxy": [x0, y0, x1, y1]}`.
    ground truth: records `{"id", "bbox": [x, y, w, h]}`, or `--refs` (JSON or JSONL refs: `ref_id`, `ann_id`,
    `split`, `sentences`, with `--instances`, the COCO instances json; the hub's parquet exports, which carry
    their boxes; or REFER's `refs(unc).p` with `--allow-pickle`, read by a restricted unpickler) and
    `--split`, giving the ids `<dataset>-<ref_id>-<sentence index>-box` of the RefCOCO reader. IoU as
    pycocotools computes it on (x, y, w, h) boxes, so ties at 0.5 fall the same way. A missing box is wrong.
    Output: Acc@0.5, mIoU (%).
    """
    if refs:
        truths = read_refcoco_ground_truth(refs, instances, split, dataset_name, allow_pickle)
    elif ground_truth:
        truths = {key: record["bbox"] for key, record in _index(read_records(ground_truth), ("id",), ground_truth).items()}
    else:
        raise ValueError("refcoco needs --ground-truth, or --refs (with --instances unless the refs carry their boxes).")
    if not truths:
        raise ValueError("The ground truth has no expression (check --split).")
    predicted = {key: _predicted_box_xywh(r) for key, r in _index(read_records(predictions), ("id",), predictions).items()}
    _check_unknown(predicted, set(truths), predictions)
    _report_missing([k for k in truths if k not in predicted], "expressions")
    keys = list(truths)
    return refcoco_accuracy_xywh([predicted.get(k) for k in keys], [truths[k] for k in keys])


def read_reasonseg_folder(folder: str, all_texts: bool) -> dict:
    """{`reasonseg-<name>-<text index>`: (target mask, ignore mask), each `(height, width)` bool} from a ReasonSeg
    folder, the ground truth LISA's `get_mask_from_json` builds (`tpo.processing.reasonseg`) on the upright image
    size; text 0 of each image only, unless `all_texts`."""
    from ..processing.images import image_size
    from ..processing.reasonseg import IGNORE, TARGET, read_labelme_json, reasonseg_label_map

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


def score_reasonseg(predictions: str, ground_truth: str, all_texts: bool = False) -> dict:
    """Reasoning segmentation masks (`mask_iou_metrics`); `ground_truth` is a ReasonSeg folder or records.

    predictions: records `{"id", "mask": RLE}` (or `"masks": [RLE, ...]`, the first is used).
    ground truth: the ReasonSeg folder (`<name>.jpg` + `<name>.json` with polygon `shapes` and `text`; ids
    `reasonseg-<name>-<text index>`), built as LISA's `get_mask_from_json` builds it: json read as UTF-8 else
    cp1252, image size after EXIF orientation, points truncated to integers, polygons drawn as OpenCV draws
    them (outline + fill), "flag" shapes left out, labels containing "ignore" (any case) left out of I and
    U, painted largest first (so an ignore region inside a target is ignored); only text 0 of each image
    is evaluated, as LISA's validation does, unless `--all-texts`. Or records `{"id", "mask": RLE, "ignore":
    RLE (optional)}`. A missing mask is empty. Output: gIoU, cIoU (%).
    """
    if Path(ground_truth).is_dir():
        truths = read_reasonseg_folder(ground_truth, all_texts)
    else:
        truths = {key: (r["mask"], r.get("ignore")) for key, r in _index(read_records(ground_truth), ("id",), ground_truth).items()}
    predicted = {key: _predicted_mask(r) for key, r in _index(read_records(predictions), ("id",), predictions).items()}
    unknown = [k for k in predicted if k not in truths]
    if unknown:  # other texts of an image are not evaluated without --all-texts; anything else is a naming error
        logger.warning("%d predicted id(s) are not evaluated (e.g. %s).", len(unknown), unknown[:3])
    _report_missing([k for k in truths if k not in predicted], "ReasonSeg samples")
    keys = list(truths)
    return mask_iou_metrics([predicted.get(k) for k in keys], [truths[k][0] for k in keys], [truths[k][1] for k in keys])


def read_mevis_ground_truth(meta_path: str, mask_dict_path: str, dataset_name: str) -> dict:
    """{`<dataset_name>-<video>-<expression>`: (video id, expression id, frame names, per-frame masks)} from MeViS
    files; each frame's mask is the union of the expression's objects, `(height, width)` bool (`(1, 1)` when no
    object of the expression appears in the video)."""
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


def score_mevis(predictions: str, ground_truth: str | None = None, meta: str | None = None,
                mask_dict: str | None = None, dataset_name: str = "mevis") -> dict:
    """Referring video segmentation (`j_and_f`); the ground truth is `meta` with `mask_dict`, or `ground_truth`
    records; `predictions` is a records file or a folder of PNGs.

    ground truth: `--meta meta_expressions.json` and `--mask-dict mask_dict.json` (MeViS / Ref-YouTube-VOS
    layout; the masks of all `anno_id`s of an expression are merged; ids `<dataset>-<video>-<expression>`)
    or `--ground-truth` records `{"id", "masks": [RLE or null per frame]}`. Predictions: records
    `{"id", "masks": [RLE or null per frame]}` (or `video_id` + `exp_id` instead of `id`), or the official
    submission folder `<dir>/<video>/<expression>/<frame>.png` (pixels > 0 are the mask). An expression
    predicted twice is refused; an expression without any prediction scores J = F = 0, as the MeViS
    evaluation scores a video missing from the submission; a missing frame of a predicted expression is an
    empty mask (the official script stops there). Output: J, F, J&F (%).
    """
    if meta and mask_dict:
        truths = read_mevis_ground_truth(meta, mask_dict, dataset_name)
    elif ground_truth:
        records = _index(read_records(ground_truth), ("id",), ground_truth)
        truths = {key: (None, None, list(range(len(r["masks"]))), [m if m else None for m in r["masks"]]) for key, r in records.items()}
    else:
        raise ValueError("mevis needs --meta with --mask-dict, or --ground-truth.")
    if Path(predictions).is_dir():
        predicted = _read_png_predictions(predictions, truths)
    else:
        by_pair = {(str(v), str(e)): key for key, (v, e, _, _) in truths.items() if v is not None}
        predicted = {}
        for index, record in enumerate(read_records(predictions)):
            key = record.get("id") or by_pair.get((str(record.get("video_id")), str(record.get("exp_id"))))
            if key is None:
                raise ValueError(f"{predictions} record {index + 1}: no id, or video_id + exp_id not in the ground truth.")
            if key in predicted:
                raise ValueError(f"{predictions} record {index + 1}: expression {key!r} appears twice.")
            predicted[key] = record.get("masks") or []
        _check_unknown(predicted, set(truths), predictions)
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
            raise ValueError(f"{predictions}: {key} has {len(pred)} predicted frames for {len(frames)} GT frames.")
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
    """{sequence name: TrackingSequence without predictions} from a LaSOT / GOT-10k folder or a records file:
    `gt_xywh` `(frames, 4)` pixels, `visible` `(frames,)` bool (or None), `resolution_wh` (or None)."""
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
    """{sequence: `(runs, frames, 4)` x,y,w,h boxes in pixels} of the sequences `names`, from a records file or
    a results folder. Records naming no GT sequence, or one twice, are refused; result files of no GT sequence
    are reported (logged)."""
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


def score_tracking(predictions: str, ground_truth: str, protocol: str = "both") -> dict:
    """Single-object tracking (`lasot_metrics`, `got10k_metrics`); `protocol`: "lasot", "got10k" or "both".

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
    """
    truths = read_tracking_ground_truth(ground_truth)
    predicted = read_tracking_predictions(predictions, list(truths))
    missing = [name for name in truths if name not in predicted]
    if missing:
        raise ValueError(f"{predictions}: no prediction for {len(missing)} sequence(s) (e.g. {missing[:3]}); "
                         f"the tracking protocols need every sequence.")
    sequences = [TrackingSequence(predicted[name], truth.gt_xywh, truth.visible, truth.resolution_wh, name)
                 for name, truth in truths.items()]
    metrics = {}
    if protocol in ("lasot", "both"):
        several = [s.name for s in sequences if len(s.pred_xywh) > 1]
        if several:
            logger.info("LaSOT scores run 1 of the %d sequence(s) with several runs (e.g. %s).", len(several), several[:3])
        metrics.update(lasot_metrics([TrackingSequence(s.pred_xywh[:1], s.gt_xywh, s.visible, None, s.name)
                                      for s in sequences]))
    if protocol in ("got10k", "both"):
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


def score_mcqa(predictions: str, ground_truth: str, convention: str = "tpo") -> dict:
    """Multiple-choice accuracy (`mcqa_accuracy`); `convention`: a key of
    `tpo.training.metrics.mcqa.ANSWER_CONVENTIONS`.

    predictions: records `{"id", "prediction": "free text"}`; ground truth: records `{"id", "answer",
    "options": [...] (optional)}` where `answer` is a letter, or MVBench rows `{"candidates": [...], "answer":
    "<candidate text>"}` (ids default to the row index when absent on both sides); an optional `task_type`
    (or `question_type`, `group`) adds per-task accuracy and their mean. A missing answer is wrong.
    Records without `answer` (open-ended questions of a LLaVA file) are left out on both sides; ids are
    compared as strings. `--convention lmms-eval` reads answers as lmms-eval's MVBench task (lowercase "a",
    "A person ..." read as letters; empty answers left out of the denominator); the default counts those
    wrong (see tpo.training.metrics.mcqa for the table of differences). Output: accuracy, unparsed (%),
    accuracy/<task>, mean_group_accuracy (and empty % with lmms-eval).
    """
    gt_records = read_records(ground_truth)
    pred_records = read_records(predictions)
    with_ids = all("id" in r for r in gt_records)
    truths = _string_keys(_index(gt_records, ("id",), ground_truth) if with_ids else dict(enumerate(gt_records)))
    predicted = _string_keys({k: r.get("prediction") for k, r in _index(pred_records, ("id",), predictions).items()}
                             if with_ids else {i: r.get("prediction") for i, r in enumerate(pred_records)})
    open_ended = {k for k, r in truths.items() if "answer" not in r}
    if open_ended:  # a LLaVA file mixes open questions (no answer letter) with multiple-choice ones
        logger.info("%d ground-truth record(s) without an answer (open-ended) are not evaluated (e.g. %s).",
                    len(open_ended), sorted(open_ended)[:3])
        truths = {k: r for k, r in truths.items() if k not in open_ended}
        predicted = {k: v for k, v in predicted.items() if k not in open_ended}
    if not truths:
        raise ValueError(f"{ground_truth}: no record with an answer; nothing to evaluate.")
    _check_unknown(predicted, set(truths), predictions)
    _report_missing([k for k in truths if k not in predicted], "questions")
    keys = list(truths)
    answers, options = zip(*(_answer_and_options(truths[k]) for k in keys))
    group_field = next((f for f in ("task_type", "question_type", "group") if all(f in truths[k] for k in keys)), None)
    groups = [str(truths[k][group_field]) for k in keys] if group_field else None
    return mcqa_accuracy([predicted.get(k) for k in keys], list(answers), list(options), groups,
                         convention=convention)



def json_ready(value):
    """`value` with NaN floats (a metric with nothing to average) as None, in nested dicts too, so that
    `json.dumps` writes standard JSON (null)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
