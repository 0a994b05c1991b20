"""Readers of the real dataset formats into the common schema (`tpo.processing.schema`).

Each reader returns a `datasets.Dataset` built lazily with `Dataset.from_generator` (cached by
`datasets`; the cache key includes each annotation file's size and modification time, so an edited
file is read again). Malformed records are handled per case, as each docstring says: a record that
cannot be understood at all (broken JSON, a pickle instead of JSON) raises with the file and line;
a record with a fixable or isolated problem is skipped (or clamped) with a logged warning naming the
file and line, and the number skipped is logged at the end.
"""

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import Dataset
from datasets.exceptions import DatasetGenerationError

from .images import ImageFileError, image_size
from .reasonseg import TARGET, read_labelme_json, reasonseg_label_map
from .refcoco_sources import load_refs, refs_need_instances
from .schema import SAMPLE_FEATURES, check_rle, empty_sample, mask_from_rle, rle_from_mask, rle_from_polygons

logger = logging.getLogger(__name__)


# Clamping a span or box by less than this (seconds or pixels) is float noise and not reported; larger
# clamps are counted and summarised once per file (with the largest and an example).
CLAMP_TOLERANCE = 1e-3


class SkipCounter:
    """Counts and logs the skipped records (and dropped parts of kept records, clamps, duplicate ids) of one
    file; `report()` logs one summary per kind and raises when the file gave no usable record."""

    def __init__(self, path: str):
        self.path = path
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()
        self.kept = 0
        self.clamps: list[tuple[float, str, str]] = []  # (excess, where, what)
        self.ids: Counter = Counter()

    def skip(self, where: str, reason: str) -> None:
        """A whole record is left out."""
        self.counts[reason.split(":")[0]] += 1
        logger.warning("%s %s: skipped (%s)", self.path, where, reason)

    def drop(self, where: str, reason: str) -> None:
        """Part of a record (one window of several) is left out; the record is kept if anything remains."""
        self.dropped[reason.split(":")[0]] += 1
        logger.warning("%s %s: dropped (%s)", self.path, where, reason)

    def clamp(self, where: str, what: str, excess: float) -> None:
        """A span or box was clamped by `excess` (seconds or pixels); summarised by `report`."""
        if excess > CLAMP_TOLERANCE:
            self.clamps.append((excess, where, what))
            logger.debug("%s %s: %s", self.path, where, what)

    def keep(self, sample: dict, key=None) -> dict:
        """Count a yielded sample (and its record key, to report duplicates)."""
        self.kept += 1
        if key is not None:
            self.ids[key] += 1
        return sample

    def report(self, what: str = "record") -> None:
        if self.clamps:
            largest = max(self.clamps)
            logger.warning("%s: clamped %d value(s) by more than %g (largest %.4g at %s: %s)", self.path,
                           len(self.clamps), CLAMP_TOLERANCE, largest[0], largest[1], largest[2])
        duplicates = {key: n for key, n in self.ids.items() if n > 1}
        if duplicates:
            logger.warning("%s: %d %s id(s) appear more than once (e.g. %s); their samples share an id, so predictions "
                           "keyed by it overwrite each other", self.path, len(duplicates), what,
                           dict(list(duplicates.items())[:3]))
        if self.counts:
            logger.warning("%s: skipped %d record(s): %s", self.path, sum(self.counts.values()), dict(self.counts))
        if self.dropped:
            logger.warning("%s: dropped %d part(s) of records: %s", self.path, sum(self.dropped.values()),
                           dict(self.dropped))
        if self.kept == 0:
            reasons = f"all {sum(self.counts.values())} skipped: {dict(self.counts)}" if self.counts else "it holds none"
            raise ValueError(f"{self.path}: no usable {what} ({reasons}); fix the records named in the warnings above "
                             f"or point the reader at the right file.")


def _signature(*paths) -> str:
    """(path, size, mtime) of each file: part of the cache key, so edited files are read again.

    A string, not a list: `Dataset.from_generator` shards list-valued `gen_kwargs` (one generator call
    per element), which would read every file once per list element.
    """
    out = []
    for path in paths:
        if path is None:
            continue
        stat = os.stat(path)
        out.append([str(path), stat.st_size, stat.st_mtime_ns])
    return json.dumps(out)


def _read_json(path) -> object:
    """A whole JSON file; broken JSON raises naming the file (the error gives line and column)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); fix the file.") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); re-save it as UTF-8 JSON.") from error


def _text_lines(path):
    """(line number, text) of a text file; a line that is not UTF-8 raises naming the file, line and byte."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path} line {line_number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                 f"{error.start + 1}); re-save the file as UTF-8.") from error


def _from_generator(generator, cache_dir: str | None = None, **gen_kwargs) -> Dataset:
    """`Dataset.from_generator` with the schema's features. `datasets` wraps an error raised by the
    generator in a `DatasetGenerationError` ("An error occurred while generating the dataset"); the
    reader's own error (a ValueError naming the file and line) is raised instead, so that callers see
    what to fix."""
    try:
        return Dataset.from_generator(generator, features=SAMPLE_FEATURES, gen_kwargs=gen_kwargs, cache_dir=cache_dir)
    except DatasetGenerationError as error:
        cause = error.__cause__
        if isinstance(cause, (ValueError, OSError)):
            raise cause from cause.__cause__
        raise


def _video_path(video_dir: str, video_id: str, extensions: tuple[str, ...]) -> str:
    for extension in extensions:
        candidate = os.path.join(video_dir, video_id + extension)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(video_dir, video_id + extensions[0])


def _finite(value) -> float | None:
    """`value` as a finite float, or None (a string such as "ten", None, a bool, NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _window(value) -> tuple[float, float] | None:
    """`[start, end]` as two finite floats, or None for anything else ([5], ["a", "b"], [1, nan], ...)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    start, end = _finite(value[0]), _finite(value[1])
    return None if start is None or end is None else (start, end)


def _clean_query(text: str) -> str:
    """A query without surrounding spaces and its final period(s) ("a man dances ." -> "a man dances")."""
    return text.strip().rstrip(".").strip()


def _clamp_span(start: float, end: float, duration: float, where: str, counter: SkipCounter, part: bool = False):
    """Clamp a span to [0, duration] (counted, summarised per file); None if nothing is left or start >= end
    (counted as a skipped record, or as a dropped part when `part`: one window of a record with several)."""
    leave_out = counter.drop if part else counter.skip
    if not start < end:
        leave_out(where, f"invalid span: start {start} >= end {end}")
        return None
    if duration > 0 and (start < 0 or end > duration):
        clamped = (max(start, 0.0), min(end, duration))
        if clamped[0] >= clamped[1]:
            leave_out(where, f"span outside the video: ({start}, {end}) s for {duration} s")
            return None
        counter.clamp(where, f"span ({start}, {end}) s clamped to the video's {duration} s",
                      max(-start, end - duration))
        return clamped
    return (start, end)


# --------------------------------------------------------------------------------------------------
# Temporal grounding
# --------------------------------------------------------------------------------------------------
def _qvhighlights_windows(record: dict, duration: float, where: str, counter: SkipCounter):
    """The record's windows, clamped; None (record skipped, reason logged) when they are malformed."""
    windows = record.get("relevant_windows", [])
    if not isinstance(windows, list) or any(_window(w) is None for w in windows):
        counter.skip(where, f"malformed relevant_windows {str(windows)[:60]}: expected [[start, end], ...] in seconds")
        return None
    spans = []
    for window in windows:
        span = _clamp_span(*_window(window), duration, where, counter, part=True)
        if span is not None:
            spans.append(list(span))
    return spans


def _qvhighlights_saliency(record: dict) -> tuple[list[int], list[list[int]]] | str:
    """(clip ids, score rows), or the reason they cannot be used."""
    clip_ids, scores = record.get("relevant_clip_ids", []), record.get("saliency_scores", [])
    try:
        clip_ids = [int(c) for c in clip_ids]
        scores = [[int(v) for v in row] for row in scores]
    except (TypeError, ValueError):
        return f"saliency malformed: relevant_clip_ids and saliency_scores must be integers ({str(scores)[:40]})"
    if len(clip_ids) != len(scores) or any(len(s) != 3 for s in scores):
        return f"saliency mismatch: {len(clip_ids)} clip ids, {len(scores)} score rows (3 each)"
    return clip_ids, scores


def _qvhighlights_rows(path, video_dir, split, video_extensions, signature):
    counter = SkipCounter(path)
    for line_number, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {line_number}: not valid JSON ({error}); fix or remove the line.") from error
        if not isinstance(record, dict):
            counter.skip(where, f"not a JSON object: {line.strip()[:40]}")
            continue
        missing = [k for k in ("qid", "query", "duration", "vid") if k not in record]
        if missing:
            counter.skip(where, f"missing fields: {missing}")
            continue
        duration = _finite(record["duration"])
        if duration is None or duration <= 0:
            counter.skip(where, f"bad duration: {record['duration']!r} is not a number of seconds > 0")
            continue
        if not isinstance(record["query"], str) or not isinstance(record["vid"], str):
            counter.skip(where, "bad fields: query and vid must be strings")
            continue
        spans = _qvhighlights_windows(record, duration, where, counter)
        if spans is None:
            continue
        if "relevant_windows" in record and not spans:
            counter.skip(where, "no valid window: every relevant window was skipped or the list is empty")
            continue
        saliency = _qvhighlights_saliency(record)
        if isinstance(saliency, str):
            counter.skip(where, saliency)
            continue
        clip_ids, scores = saliency
        yield counter.keep(empty_sample(
            id=f"qvh-{record['qid']}", source="qvhighlights", split=split, task="temporal", media_type="video",
            media_path=_video_path(video_dir, record["vid"], video_extensions), query=record["query"],
            duration_seconds=duration, spans_seconds=spans, saliency_clip_seconds=2.0,
            saliency_clip_ids=clip_ids, saliency_scores=scores,
            meta={"qid": record["qid"], "vid": record["vid"],
                  **{k: v for k, v in record.items() if k not in _QVHIGHLIGHTS_FIELDS}},
        ), key=record["qid"])
    counter.report("qid")


# The fields of a QVHighlights record; any other key of a record is kept in the sample's `meta` (e.g. the
# synthetic benchmark's `alternative_windows`, from which evaluation computes the question-blind floor).
_QVHIGHLIGHTS_FIELDS = ("qid", "query", "duration", "vid", "relevant_windows", "relevant_clip_ids", "saliency_scores")


def read_qvhighlights(jsonl_path: str, video_dir: str, split: str = "train",
                      video_extensions: tuple[str, ...] = (".mp4", ".mkv", ".webm"), cache_dir: str | None = None) -> Dataset:
    """QVHighlights / CG-DETR jsonl: `qid, query, duration, vid, relevant_windows [[st, ed]]`,
    `relevant_clip_ids` (2-second clips) and `saliency_scores` (3 annotators, 0-4 per relevant clip).

    Malformed: broken JSON or a line that is not UTF-8 raises (file and line); a record that is not an object,
    lacks fields, has a duration that is not a number > 0 (`"ten"`), malformed windows (`[[5]]`,
    `["a", "b"]`, NaN), saliency rows that do not match the clip ids, or no valid window left is skipped
    with a warning naming the line, and the skips are counted (one summary warning per file); a window with
    start >= end is dropped the same way; windows beyond the duration are clamped (one summary per file
    for clamps over CLAMP_TOLERANCE); repeated qids are warned about; a file with no usable record raises.
    Records without `relevant_windows` (the test split) are kept, without spans.
    """
    return _from_generator(_qvhighlights_rows, cache_dir, path=str(jsonl_path), video_dir=str(video_dir),
                           split=split, video_extensions=tuple(video_extensions), signature=_signature(jsonl_path))


def _load_durations(durations) -> dict[str, float]:
    """{video id: seconds} from a dict, a json object, or a csv with a header: the id column is `id`
    (else the first), the duration column `duration`, else `length` (Charades' own csv), else the second."""
    if durations is None:
        return {}
    if isinstance(durations, dict):
        return {str(k): float(v) for k, v in durations.items()}
    text = Path(durations).read_text(encoding="utf-8")
    if str(durations).endswith(".json"):
        return {str(k): float(v) for k, v in json.loads(text).items()}
    rows = csv.reader(io.StringIO(text))
    header = [name.strip().lower() for name in next(rows, [])]
    if len(header) < 2:
        raise ValueError(f"{durations}: a durations csv needs a header with an id and a duration column.")
    id_column = header.index("id") if "id" in header else 0
    duration_column = next((header.index(n) for n in ("duration", "length") if n in header), 1)
    out = {}
    for line_number, row in enumerate(rows, 2):
        if not row or not row[id_column].strip():
            continue
        try:
            out[row[id_column].strip()] = float(row[duration_column])
        except (ValueError, IndexError) as error:
            raise ValueError(f"{durations} line {line_number}: no duration in column "
                             f"{header[duration_column]!r} ({error}); fix the line.") from error
    return out


def _charades_rows(path, video_dir, split, durations, video_extensions, signature):
    from .video import VideoLoadError, probe_video

    counter = SkipCounter(path)
    known = _load_durations(durations)
    for line_number, line in _text_lines(path):
        line = line.strip()
        if not line:
            continue
        where = f"line {line_number}"
        head, separator, query = line.partition("##")
        parts = head.split()
        if not separator or len(parts) != 3:
            counter.skip(where, f"malformed line (expected 'VIDEOID START END##query'): {line[:60]!r}")
            continue
        video_id = parts[0]
        start, end = _finite(parts[1]), _finite(parts[2])
        if start is None or end is None:
            counter.skip(where, f"malformed times: {parts[1:]} are not finite numbers of seconds")
            continue
        media_path = _video_path(video_dir, video_id, video_extensions)
        duration = known.get(video_id)
        if duration is None:
            try:
                duration = probe_video(media_path).duration_seconds
            except VideoLoadError as error:
                counter.skip(where, f"unreadable video: {error}")
                continue
            known[video_id] = duration
        span = _clamp_span(start, end, duration, where, counter)
        if span is None:
            continue
        yield counter.keep(empty_sample(
            id=f"charades-{video_id}-{line_number}", source="charades_sta", split=split, task="temporal",
            media_type="video", media_path=media_path, query=_clean_query(query), duration_seconds=duration,
            spans_seconds=[list(span)], meta={"vid": video_id},
        ))
    counter.report("query")


def read_charades_sta(txt_path: str, video_dir: str, durations: str | dict | None = None, split: str = "test",
                      video_extensions: tuple[str, ...] = (".mp4",), cache_dir: str | None = None) -> Dataset:
    """Charades-STA text lines `VIDEOID START END##query` (seconds).

    `durations`: a dict, a json {id: seconds} or a csv with a header (`id` and `duration` or `length`
    columns, so Charades' own `Charades_v1_test.csv` works); videos without one are probed with PyAV.
    Malformed lines (times that are not finite numbers), start >= end and unreadable videos are skipped with
    a warning naming the line; a line that is not UTF-8 raises naming it; spans past the end are clamped
    (Charades annotations often overshoot by a fraction of a second; one summary per file counts the
    clamps over CLAMP_TOLERANCE, float noise below it is not reported). No usable line raises.
    """
    return _from_generator(_charades_rows, cache_dir, path=str(txt_path), video_dir=str(video_dir), split=split,
                           durations=durations if not isinstance(durations, os.PathLike) else str(durations),
                           video_extensions=tuple(video_extensions),
                           signature=_signature(txt_path, None if isinstance(durations, dict) else durations))


def _activitynet_rows(path, video_dir, split, video_extensions, signature):
    counter = SkipCounter(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{video id: {{duration, timestamps, sentences}}}}.")
    for video_id, record in data.items():
        where = f"video {video_id}"
        if not isinstance(record, dict):
            counter.skip(where, f"not an object: {str(record)[:40]} (expected {{duration, timestamps, sentences}})")
            continue
        timestamps, sentences = record.get("timestamps", []), record.get("sentences", [])
        if "duration" not in record or not isinstance(timestamps, list) or not isinstance(sentences, list) \
                or len(timestamps) != len(sentences):
            counter.skip(where, f"mismatch: {len(timestamps)} timestamps, {len(sentences)} sentences, "
                                f"duration {'present' if 'duration' in record else 'missing'}")
            continue
        duration = _finite(record["duration"])
        if duration is None or duration <= 0:
            counter.skip(where, f"bad duration: {record['duration']!r} is not a number of seconds > 0")
            continue
        for index, (window, sentence) in enumerate(zip(timestamps, sentences)):
            part = f"{where} sentence {index}"
            if _window(window) is None or not isinstance(sentence, str):
                counter.skip(part, f"malformed sentence: timestamp {str(window)[:40]} (expected [start, end] in "
                                   f"seconds) with sentence {str(sentence)[:40]!r}")
                continue
            span = _clamp_span(*_window(window), duration, part, counter)
            if span is None:
                continue
            yield counter.keep(empty_sample(
                id=f"anet-{video_id}-{index}", source="activitynet_captions", split=split, task="temporal",
                media_type="video", media_path=_video_path(video_dir, video_id, video_extensions),
                query=_clean_query(sentence), duration_seconds=duration, spans_seconds=[list(span)],
                meta={"vid": video_id},
            ))
    counter.report("sentence")


def read_activitynet_captions(json_path: str, video_dir: str, split: str = "train",
                              video_extensions: tuple[str, ...] = (".mp4", ".mkv", ".webm"),
                              cache_dir: str | None = None) -> Dataset:
    """ActivityNet Captions json `{vid: {duration, timestamps: [[s, e]], sentences: [...]}}`, one
    sample per sentence. Broken JSON raises; a video entry that is not an object, whose duration is not a
    number > 0 or whose timestamps and sentences differ in number is skipped with a warning, and so is a
    sentence whose timestamp is not `[start, end]`; spans are clamped to the duration (one summary per file);
    a query keeps no final period nor space ("a man dances ." -> "a man dances")."""
    return _from_generator(_activitynet_rows, cache_dir, path=str(json_path), video_dir=str(video_dir), split=split,
                           video_extensions=tuple(video_extensions), signature=_signature(json_path))


# --------------------------------------------------------------------------------------------------
# Referring expressions (boxes and masks)
# --------------------------------------------------------------------------------------------------
def _refcoco_box(annotation: dict, image: dict) -> tuple[list[float], list[float], int, int] | str:
    """(box clamped to the image, unclamped xyxy box, height, width), or the reason it is unusable."""
    size = (_finite(image.get("height")), _finite(image.get("width")))
    if None in size or min(size) <= 0:
        return f"image without size: image {image.get('id')} has no height/width ({image.get('height')!r}, {image.get('width')!r})"
    height, width = int(size[0]), int(size[1])
    bbox = annotation.get("bbox")
    values = [_finite(v) for v in bbox] if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else None
    if values is None or None in values:
        return f"annotation without bbox: annotation {annotation.get('id')} has bbox {bbox!r}, expected [x, y, w, h] pixels"
    x, y, w, h = values
    unclamped = [x, y, x + w, y + h]
    return [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)], unclamped, height, width


def _refcoco_mask(annotation: dict, height: int, width: int, instances_path: str, where: str,
                  counter: SkipCounter | None) -> dict | None:
    """The annotation's mask as an RLE with string counts: polygons with fewer than 3 points are dropped
    (counted by `counter` if given), a corrupt RLE or one of another size raises naming the annotation."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list) and segmentation:
        polygons = []
        for index, polygon in enumerate(segmentation):
            coordinates = [_finite(v) for v in polygon] if isinstance(polygon, (list, tuple)) else [None]
            if None in coordinates or len(coordinates) < 6 or len(coordinates) % 2:
                if counter is not None:
                        counter.drop(where, f"polygon {index} of annotation {annotation.get('id')} has "
                                        f"{len(coordinates) // 2} point(s) or non-numbers: a polygon needs 3 or more "
                                        f"(x, y) points")
                continue
            polygons.append(coordinates)
        return rle_from_polygons(polygons, height, width) if polygons else None
    if isinstance(segmentation, dict):
        label = f"{instances_path} annotation {annotation.get('id')}"
        check_rle(segmentation, label)
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"{label}: RLE of size {segmentation['size']} for a {height}x{width} image; the annotation "
                             f"file is inconsistent.")
        counts = segmentation["counts"]
        return {"size": [height, width],
                "counts": counts if isinstance(counts, str) else _compressed_counts(segmentation, height, width)}
    return None


def _image_alternatives(annotations: list[dict], image: dict, with_masks: bool, instances_path, where: str) -> dict:
    """Every usable annotated object of an image: boxes (x0, y0, x1, y1) pixels and, with `with_masks`, RLE
    masks; the answers a question-blind guess chooses from (evaluation's floor). Unusable annotations are
    left out here without a warning (the refs that point to them are reported)."""
    boxes, masks = [], []
    for annotation in annotations:
        geometry = _refcoco_box(annotation, image)
        if isinstance(geometry, str):
            continue
        box, _, height, width = geometry
        boxes.append(box)
        if with_masks:
            mask = _refcoco_mask(annotation, height, width, instances_path, where, None)
            if mask is not None:
                masks.append(mask)
    return {"boxes_xyxy_pixels": boxes, **({"masks_rle": masks} if with_masks else {})}


def _refcoco_rows(instances_path, refs_path, image_dir, split, tasks, dataset_name, allow_pickle, signature,
                  alternatives=False):
    counter = SkipCounter(refs_path)
    refs = load_refs(refs_path, allow_pickle)
    images, annotations = {}, {}
    if refs_need_instances(refs):
        if not instances_path:
            raise ValueError(f"{refs_path}: these refs point into a COCO instances file; give instances_json.")
        coco = _read_json(instances_path)
        if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
            raise ValueError(f"{instances_path}: not a COCO instances file (needs 'images' and 'annotations').")
        images = {image.get("id"): image for image in coco["images"] if isinstance(image, dict)}
        annotations = {annotation.get("id"): annotation for annotation in coco["annotations"] if isinstance(annotation, dict)}
    by_image: dict = {}  # image id -> its annotations, for `alternatives`
    alternatives_of_image: dict = {}
    if alternatives:
        sources = annotations.values() if annotations else (r["_annotation"] | {"image_id": r.get("image_id")}
                                                            for r in refs if isinstance(r, dict) and "_annotation" in r)
        for annotation in sources:
            by_image.setdefault(annotation.get("image_id"), []).append(annotation)
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict):
            counter.skip(f"ref {index}", f"not an object: {str(ref)[:40]}")
            continue
        if split is not None and "split" in ref and ref.get("split") != split:
            continue
        where = f"ref {ref.get('ref_id', index)}"
        annotation = ref.get("_annotation") or annotations.get(ref.get("ann_id"))
        image = ref.get("_image") or images.get(ref.get("image_id"))
        if annotation is None or image is None:
            counter.skip(where, f"unknown annotation {ref.get('ann_id')} or image {ref.get('image_id')}")
            continue
        geometry = _refcoco_box(annotation, image)
        if isinstance(geometry, str):
            counter.skip(where, geometry)
            continue
        box, unclamped, height, width = geometry
        if box[0] >= box[2] or box[1] >= box[3]:
            counter.skip(where, f"degenerate box: {annotation['bbox']} in a {width}x{height} image")
            continue
        if box != unclamped:
            counter.clamp(where, f"box {unclamped} clamped to the {width}x{height} image",
                          max(abs(a - b) for a, b in zip(box, unclamped)))
        mask = _refcoco_mask(annotation, height, width, instances_path, where, counter) if "mask" in tasks else None
        if "mask" in tasks and mask is None:
            counter.skip(where, "no segmentation for a mask sample")
        alternative = None
        if alternatives:
            key = ref.get("image_id")
            if key not in alternatives_of_image:
                alternatives_of_image[key] = _image_alternatives(by_image.get(key, [annotation]), image, "mask" in tasks,
                                                                 instances_path, where)
            alternative = alternatives_of_image[key]
        sentences = ref.get("sentences") if isinstance(ref.get("sentences"), list) else []
        for sentence_index, sentence in enumerate(sentences):
            text = (sentence.get("sent") or sentence.get("raw")) if isinstance(sentence, dict) else sentence
            if not isinstance(text, str) or not text.strip():
                continue
            base = dict(source=dataset_name, split=ref.get("split", split or ""), media_type="image",
                        media_path=os.path.join(image_dir, str(image.get("file_name"))), query=text.strip(),
                        image_size=[height, width], boxes_xyxy_pixels=[box],
                        meta={"ref_id": ref.get("ref_id"), "ann_id": annotation.get("id"), "image_id": image.get("id"),
                              **({"alternatives": alternative} if alternatives else {})})
            if "region" in tasks:
                yield counter.keep(empty_sample(id=f"{dataset_name}-{ref.get('ref_id', index)}-{sentence_index}-box",
                                                task="region", **base))
            if "mask" in tasks and mask is not None:
                yield counter.keep(empty_sample(id=f"{dataset_name}-{ref.get('ref_id', index)}-{sentence_index}-mask",
                                                task="mask", masks_rle=[mask], **base))
    counter.report("ref")


def _compressed_counts(segmentation: dict, height: int, width: int) -> str:
    """Uncompressed (list) RLE counts -> compressed string counts."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.frPyObjects(segmentation, height, width)
    return encoded["counts"].decode("ascii")


def read_refcoco(instances_json: str | None, refs_path: str, image_dir: str, split: str | None = "train",
                 tasks: tuple[str, ...] = ("region",), dataset_name: str = "refcoco", allow_pickle: bool = False,
                 cache_dir: str | None = None, alternatives: bool = False) -> Dataset:
    """RefCOCO / RefCOCO+ / RefCOCOg: COCO instances json (images, annotations with `bbox` xywh and
    polygon or RLE `segmentation`) and refs (ref_id, ann_id, image_id, split, sentences) from JSON,
    parquet, the hub's parquet exports (REFER's with `raw_anns`/`raw_image_info`, lmms-eval's; these
    need no instances json: pass None) or, with `allow_pickle=True`, REFER's `refs(unc).p` pickles read
    by a restricted unpickler (`tpo.processing.refcoco_sources`). One sample per sentence and task
    (`tasks` among "region", "mask").

    Malformed: a pickle without `allow_pickle`, or one that names any class or function, raises with how
    to convert it; a ref that is not an object, points to an unknown annotation or image, whose annotation
    has no usable `bbox` or whose image no `height`/`width`, or whose box is degenerate after clamping is
    skipped with a warning naming the ref; polygons with fewer than 3 points are dropped (counted); an RLE
    whose runs do not cover its size, or of another size than its image, raises (the files disagree).
    Boxes outside the image are clamped (one summary per file). No usable ref raises.

    `alternatives`: each sample's `meta["alternatives"]` lists every annotated object of its image (boxes, and
    masks for the mask task), from which evaluation computes the question-blind floor.
    """
    unknown = set(tasks) - {"region", "mask"}
    if unknown:
        raise ValueError(f"Unknown task(s) {sorted(unknown)} for RefCOCO; use 'region' and/or 'mask'.")
    return _from_generator(_refcoco_rows, cache_dir, instances_path=str(instances_json) if instances_json else None,
                           refs_path=str(refs_path), image_dir=str(image_dir), split=split, tasks=tuple(tasks),
                           dataset_name=dataset_name, allow_pickle=bool(allow_pickle),
                           signature=_signature(instances_json, refs_path), alternatives=bool(alternatives))


def _frame_size(frame_path: str, video_id: str) -> list[int]:
    try:
        return list(image_size(frame_path))
    except ImageFileError as error:
        raise ValueError(f"Video {video_id}: cannot read its first frame: {error}; check frames_dir and the frame "
                         "names in meta_expressions.json.") from error


def _mask_dict_masks(mask_dict: dict, mask_path: str, ids: list, video_id: str, num_frames: int,
                     size: list[int]) -> tuple[list[dict], list[int]]:
    """MeViS: the objects' RLEs merged per frame (a null RLE is an empty mask); every frame annotated."""
    masks_rle, indices = [], []
    for frame_index in range(num_frames):
        merged = np.zeros(size, dtype=bool)
        for annotation_id in ids:
            per_frame = mask_dict[str(annotation_id)]
            if frame_index >= len(per_frame):
                raise ValueError(f"{mask_path}: annotation {annotation_id} has {len(per_frame)} masks for "
                                 f"{num_frames} frames of video {video_id}; the files disagree.")
            rle = per_frame[frame_index]
            if rle is None:
                continue
            where = f"{mask_path}: annotation {annotation_id} frame {frame_index}"
            check_rle(rle, where)
            if [int(v) for v in rle["size"]] != size:
                raise ValueError(f"{where} has an RLE of size {list(rle['size'])}, but the frames of video {video_id} "
                                 f"are {size}.")
            merged |= mask_from_rle(rle, where)
        masks_rle.append(rle_from_mask(merged))
        indices.append(frame_index)
    return masks_rle, indices


def _palette_masks(annotations_dir: str, video_id: str, frames: list[str], ids: list, size: list[int],
                   cache: dict) -> tuple[list[dict], list[int]]:
    """Ref-YouTube-VOS: `annotations_dir/vid/frame.png` palette PNGs whose pixel values are object ids.
    Frames without a PNG are not annotated (left out of `mask_frame_indices`)."""
    from PIL import Image

    object_ids = [int(i) for i in ids]
    masks_rle, indices = [], []
    for frame_index, name in enumerate(frames):
        png_path = os.path.join(annotations_dir, video_id, name + ".png")
        if png_path not in cache:
            if not os.path.exists(png_path):
                cache[png_path] = None
            else:
                with Image.open(png_path) as image:
                    if image.mode not in ("P", "L", "I", "I;16"):
                        raise ValueError(f"{png_path}: mode {image.mode}, expected a palette or single-channel PNG "
                                         "whose pixel values are object ids.")
                    cache[png_path] = np.asarray(image)
        labels = cache[png_path]
        if labels is None:
            continue
        if list(labels.shape) != size:
            raise ValueError(f"{png_path}: annotation of size {list(labels.shape)}, but the frames of video "
                             f"{video_id} are {size}.")
        masks_rle.append(rle_from_mask(np.isin(labels, object_ids)))
        indices.append(frame_index)
    return masks_rle, indices


def _mevis_rows(meta_path, mask_path, annotations_dir, frames_dir, split, fps, frame_extension, dataset_name,
                signature, alternatives=False):
    counter = SkipCounter(meta_path)
    meta = _read_json(meta_path)
    mask_dict = _read_json(mask_path) if mask_path else {}
    if not isinstance(meta, dict) or not isinstance(meta.get("videos"), dict):
        raise ValueError(f"{meta_path}: no 'videos' object; expected {{'videos': {{vid: {{frames, expressions}}}}}}.")
    if not isinstance(mask_dict, dict):
        raise ValueError(f"{mask_path}: expected an object {{anno_id: [RLE or null per frame]}}.")
    for video_id, video in meta["videos"].items():
        if not isinstance(video, dict) or not isinstance(video.get("expressions", {}), dict):
            counter.skip(f"video {video_id}", f"not an object with frames and expressions: {str(video)[:40]}")
            continue
        frames = list(video.get("frames", []))
        if not frames:
            counter.skip(f"video {video_id}", "no frames listed")
            continue
        frame_paths = [os.path.join(frames_dir, video_id, name + frame_extension) for name in frames]
        size = _frame_size(frame_paths[0], video_id) if (mask_dict or annotations_dir) else None
        png_cache: dict = {}
        objects: dict = {}  # the video's objects (one per distinct id set of its expressions), for `alternatives`
        rows = []
        for expression_id, expression in video.get("expressions", {}).items():
            where = f"video {video_id} expression {expression_id}"
            if not isinstance(expression, dict) or not isinstance(expression.get("exp", ""), str):
                counter.skip(where, f"not an object with a text 'exp': {str(expression)[:40]}")
                continue
            ids = expression.get("anno_id", expression.get("obj_id", []))
            ids = [ids] if isinstance(ids, (int, str)) else list(ids)
            masks_rle, indices = [], []
            if mask_dict:
                missing = [i for i in ids if str(i) not in mask_dict]
                if missing:
                    counter.skip(where, f"unknown annotation ids: {missing} not in {mask_path}")
                    continue
                masks_rle, indices = _mask_dict_masks(mask_dict, mask_path, ids, video_id, len(frames), size)
            elif annotations_dir:
                ids = expression.get("obj_id", ids)
                ids = [ids] if isinstance(ids, (int, str)) else list(ids)
                masks_rle, indices = _palette_masks(annotations_dir, video_id, frames, ids, size, png_cache)
            objects.setdefault(json.dumps(sorted(map(str, ids))), (masks_rle, indices))
            rows.append(dict(
                id=f"{dataset_name}-{video_id}-{expression_id}", source=dataset_name, split=split, task="mask",
                media_type="frames", media_path=os.path.join(frames_dir, video_id), frame_paths=frame_paths,
                query=expression.get("exp", "").strip(), fps=fps, duration_seconds=len(frames) / fps,
                image_size=size or [0, 0], masks_rle=masks_rle, mask_frame_indices=indices,
                meta={"video": video_id, "expression": expression_id, "ids": ids},
            ))
        for row in rows:
            if alternatives:  # every object's masks on the frames this sample annotates
                frames_of_row = row["mask_frame_indices"]
                row["meta"]["alternatives"] = {"masks_rle": [
                    [dict(zip(indices, masks)).get(f) for f in frames_of_row] for masks, indices in objects.values()]}
            yield counter.keep(empty_sample(**row))
    counter.report("expression")


def read_mevis(meta_expressions_json: str, mask_dict_json: str | None, frames_dir: str, split: str = "train",
               fps: float = 6.0, frame_extension: str = ".jpg", dataset_name: str = "mevis",
               annotations_dir: str | None = None, cache_dir: str | None = None, alternatives: bool = False) -> Dataset:
    """MeViS and Ref-YouTube-VOS: `meta_expressions.json` {videos: {vid: {frames: [...], expressions:
    {eid: {exp, anno_id | obj_id}}}}}, frames as JPEG folders `frames_dir/vid/frame.jpg` (played at `fps`).
    One sample per expression (task "mask", media_type "frames").

    Masks: MeViS `mask_dict.json` {anno_id: [RLE per frame or null]}: the masks of the expression's
    objects are merged per frame (null = empty), every frame annotated. Ref-YouTube-VOS: no mask dict but
    `annotations_dir` with palette PNGs `annotations_dir/vid/frame.png` (pixel value = obj_id): frames
    without a PNG are left out of `mask_frame_indices`. With neither (test splits), no masks.

    `alternatives`: each sample's `meta["alternatives"]["masks_rle"]` holds every object of its video (one per
    distinct id set of the video's expressions) on the sample's annotated frames (None where that object has
    no annotation), for evaluation's question-blind floor.

    Malformed: broken JSON raises; an RLE whose runs do not cover its size, an RLE or PNG whose size
    differs from the frames, or fewer masks than frames, raises (the files disagree); expressions naming
    unknown annotation ids or that are not objects with a text `exp` are skipped with a warning and
    counted; videos without frames (or not objects) are skipped the same way. No usable expression raises.
    """
    return _from_generator(_mevis_rows, cache_dir, meta_path=str(meta_expressions_json),
                           mask_path=str(mask_dict_json) if mask_dict_json else None,
                           annotations_dir=str(annotations_dir) if annotations_dir else None, frames_dir=str(frames_dir),
                           split=split, fps=float(fps), frame_extension=frame_extension, dataset_name=dataset_name,
                           signature=_signature(meta_expressions_json, mask_dict_json), alternatives=bool(alternatives))


def _reasonseg_rows(folder, split, image_extensions, signature):
    counter = SkipCounter(folder)
    for json_path in sorted(Path(folder).glob("*.json")):
        where = json_path.name
        record = read_labelme_json(json_path)
        image_path = next((json_path.with_suffix(e) for e in image_extensions if json_path.with_suffix(e).exists()), None)
        if image_path is None:
            counter.skip(where, f"no image next to it ({', '.join(image_extensions)})")
            continue
        shapes, texts = record.get("shapes", []), record.get("text", [])
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(shapes, list) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            counter.skip(where, "malformed record: 'shapes' must be a list and 'text' a string or a list of strings")
            continue
        try:
            height, width = image_size(image_path)  # upright (EXIF orientation), as LISA's cv2.imread
        except ImageFileError as error:
            counter.skip(where, f"unreadable image: {error}")
            continue
        try:
            labels = reasonseg_label_map(shapes, height, width, str(json_path))
        except ValueError as error:
            counter.skip(where, f"malformed shapes: {error}")
            continue
        target = labels == TARGET  # the "ignore" regions (255) are not target pixels
        if not target.any():
            counter.skip(where, "no target pixel: every shape is 'flag' or 'ignore', or there is none")
            continue
        mask = rle_from_mask(target)
        for index, text in enumerate(texts):
            yield counter.keep(empty_sample(
                id=f"reasonseg-{json_path.stem}-{index}", source="reasonseg", split=split, task="mask",
                media_type="image", media_path=str(image_path), query=text.strip(), image_size=[height, width],
                masks_rle=[mask], meta={"is_sentence": bool(record.get("is_sentence", False))},
            ))
    counter.report("image")


def read_reasonseg(folder: str, split: str = "val", image_extensions: tuple[str, ...] = (".jpg", ".png"),
                   cache_dir: str | None = None) -> Dataset:
    """ReasonSeg: a folder of images, each with a json of polygon `shapes` and `text` queries. One sample
    per query; the mask is LISA's ground truth (`tpo.processing.reasonseg`): points truncated to integers,
    polygons drawn as OpenCV draws them (outline + fill), "flag" shapes left out, labels containing
    "ignore" painted as not-target, largest polygon first, on the image's upright size (EXIF orientation);
    json read as UTF-8, else cp1252.
    Broken JSON raises; a json without image, with an unreadable image (e.g. over PIL's pixel limit),
    malformed shapes or no target pixel is skipped with a warning and counted."""
    files = sorted(Path(folder).glob("*.json"))
    return _from_generator(_reasonseg_rows, cache_dir, folder=str(folder), split=split,
                           image_extensions=tuple(image_extensions), signature=_signature(*files))


# --------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


_LLAVA_FIELDS = ("id", "image", "video", "conversations", "options", "answer")


def _llava_media(record: dict, media_dir: str) -> tuple[str, str] | str:
    """(media_type, media_path), or the reason the record cannot be used."""
    for kind in ("image", "video"):
        value = record.get(kind)
        if not value:
            continue
        if isinstance(value, list):
            if len(value) != 1:
                return f"multi-{kind} record ({len(value)} {kind}s): the schema holds one media file per sample"
            value = value[0]
        return kind, os.path.join(media_dir, str(value))
    return "none", ""


def _llava_rows(path, media_dir, split, fps, signature):
    counter = SkipCounter(path)
    records = _read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of conversation records.")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            counter.skip(f"record {index}", f"not an object: {type(record).__name__}")
            continue
        where = f"record {index} (id {record.get('id', '?')})"
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            counter.skip(where, "no conversations")
            continue
        roles = [_ROLES.get(turn.get("from")) for turn in turns]
        if None in roles or roles[0] != "user" or "assistant" not in roles:
            counter.skip(where, f"bad roles: {[turn.get('from') for turn in turns]}")
            continue
        if not all(isinstance(turn.get("value"), str) for turn in turns):
            counter.skip(where, "bad turns: a turn has no string 'value'")
            continue
        media = _llava_media(record, media_dir)
        if isinstance(media, str):
            counter.skip(where, f"unsupported media: {media}")
            continue
        media_type, media_path = media
        yield counter.keep(empty_sample(
            id=f"llava-{record.get('id', index)}", source="llava", split=split, task="text", media_type=media_type,
            media_path=media_path, conversations=[{"role": r, "content": t["value"]} for r, t in zip(roles, turns)],
            options=[str(o) for o in record.get("options", [])], answer=str(record.get("answer", "")),
            fps=fps if media_type == "video" else 0.0,
            meta={k: v for k, v in record.items() if k not in _LLAVA_FIELDS},
        ), key=record.get("id", index))
    counter.report("conversation")


def read_llava_conversations(json_path: str, media_dir: str, split: str = "train", fps: float = 0.0,
                             cache_dir: str | None = None) -> Dataset:
    """LLaVA-style conversations `[{id, image | video, conversations: [{from: human | gpt, value}]}]`
    (image, video or text only), with optional `options` and `answer` for multiple-choice questions; roles
    human/gpt become user/assistant and `<image>` / `<video>` placeholders are kept as written. Other
    record keys (e.g. `category`) go to `meta`. `fps` is stored for video records (the rate to sample at).

    Malformed: broken JSON (or a file that is not a list) raises; records without conversations, with
    roles other than human/gpt (or not starting with the human), with a turn lacking a string `value`, or
    with several images/videos are skipped with a warning naming the record index and id, and counted."""
    return _from_generator(_llava_rows, cache_dir, path=str(json_path), media_dir=str(media_dir), split=split,
                           fps=float(fps), signature=_signature(json_path))


# --------------------------------------------------------------------------------------------------
# Specs (as written in YAML configs and the synthetic manifest)
# --------------------------------------------------------------------------------------------------
# format -> (reader, {spec key: reader argument})
READERS = {
    "qvhighlights": (read_qvhighlights, {"jsonl": "jsonl_path", "video_dir": "video_dir", "split": "split"}),
    "charades_sta": (read_charades_sta, {"txt": "txt_path", "video_dir": "video_dir", "durations": "durations",
                                                 "split": "split"}),
    "activitynet_captions": (read_activitynet_captions, {"json": "json_path", "video_dir": "video_dir",
                                                                 "split": "split"}),
    "refcoco": (read_refcoco, {"instances": "instances_json", "refs": "refs_path", "image_dir": "image_dir",
                                       "split": "split", "tasks": "tasks", "dataset_name": "dataset_name",
                                       "allow_pickle": "allow_pickle", "alternatives": "alternatives"}),
    "mevis": (read_mevis, {"meta_expressions": "meta_expressions_json", "mask_dict": "mask_dict_json",
                                   "frames_dir": "frames_dir", "split": "split", "fps": "fps",
                                   "dataset_name": "dataset_name", "annotations_dir": "annotations_dir",
                                   "alternatives": "alternatives"}),
    "reasonseg": (read_reasonseg, {"folder": "folder", "split": "split"}),
    "llava": (read_llava_conversations, {"json": "json_path", "media_dir": "media_dir", "split": "split",
                                                 "fps": "fps"}),
}


def registered_readers() -> dict:
    """`READERS` and the multiple-choice benchmarks' (`benchmark_readers` reads with this module's helpers, so
    it is imported here, not at the top)."""
    from .benchmark_readers import BENCHMARK_READERS

    return {**READERS, **BENCHMARK_READERS}


# Arguments a spec may leave out (test splits of MeViS / Ref-YouTube-VOS ship no mask_dict.json; the hub's
# RefCOCO parquet exports carry their annotations and images, so need no instances json).
SPEC_DEFAULTS = {"mevis": {"mask_dict_json": None}, "refcoco": {"instances_json": None}}


def check_spec(spec: dict) -> tuple:
    """(reader, keyword arguments, max_samples) of a spec, without reading anything; raises ValueError
    naming the spec for an unknown format or key."""
    spec = dict(spec)
    fmt = spec.pop("format", None)
    readers = registered_readers()
    if fmt not in readers:
        raise ValueError(f"Unknown dataset format {fmt!r} in {spec}; formats: {sorted(readers)}.")
    max_samples = spec.pop("max_samples", None)
    reader, names = readers[fmt]
    unknown = set(spec) - set(names)
    if unknown:
        raise ValueError(f"Unknown key(s) {sorted(unknown)} for format {fmt!r}; expected {sorted(names)}.")
    kwargs = {names[key]: (tuple(value) if isinstance(value, list) else value) for key, value in spec.items()}
    return reader, {**SPEC_DEFAULTS.get(fmt, {}), **kwargs}, max_samples


def read_spec(spec: dict) -> Dataset:
    """One dataset from a spec such as {"format": "qvhighlights", "jsonl": ..., "video_dir": ...,
    "max_samples": 1000}."""
    reader, kwargs, max_samples = check_spec(spec)
    dataset = reader(**kwargs)
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(int(max_samples)))
    return dataset


def read_specs(specs: list[dict]) -> Dataset:
    """All specs concatenated (an empty dataset of the schema when there are none)."""
    from datasets import concatenate_datasets

    parts = [read_spec(spec) for spec in specs]
    parts = [p for p in parts if len(p)]
    if not parts:
        return Dataset.from_dict({name: [] for name in SAMPLE_FEATURES}, features=SAMPLE_FEATURES)
    return concatenate_datasets(parts)
