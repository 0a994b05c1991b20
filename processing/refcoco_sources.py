"""RefCOCO/+/g refs in the layouts they are published in, read without running untrusted code.

Layouts (`load_refs` tells them apart by suffix and columns):
- REFER refs, as JSON (a list of refs: `ref_id, ann_id, image_id, split, sentences[].sent`) or parquet
  with those columns; boxes and masks come from the COCO instances json.
- REFER's published pickles, `refs(unc).p`, `refs(umd).p`, `refs(google).p`: read only with
  `allow_pickle=True`, by a restricted unpickler that builds plain containers, strings and numbers and
  refuses anything that names a class or function (the way a pickle runs code), with an error naming
  the file and what it asked for. Python 2 byte strings are decoded as UTF-8, else Latin-1.
- The REFER parquet export on the Hugging Face hub (e.g. `jxu124/refcoco`): the refs' columns plus
  `raw_anns` (the annotation, a JSON string) and `raw_image_info` (the image, a JSON string), so no
  instances json is needed.
- The lmms-eval parquet export (e.g. `lmms-lab/RefCOCO`): one row per annotation with `question_id`,
  `answer` (the referring expressions), `bbox` (x, y, w, h), `segmentation` (one flat polygon),
  `file_name` and the embedded `image` (its header gives the size; pixels are read from
  `image_dir/file_name`). These rows carry no split column: the file is one split.

Every layout becomes a list of REFER-style refs; refs from the hub exports carry their annotation and
image in `_annotation` and `_image`.
"""

import io
import json
import pickle
from pathlib import Path

PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, tuples, strings, bytes, numbers, booleans and None only: every opcode
    that could build anything else goes through `find_class`, which refuses."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, and only plain containers, strings and numbers "
                                     f"are read")


def load_plain_pickle(path) -> object:
    """A pickle of plain data (containers, strings, numbers), or ValueError naming the file."""
    for encoding in ("utf-8", "latin-1"):
        with open(path, "rb") as handle:
            try:
                return _PlainDataUnpickler(handle, encoding=encoding).load()
            except UnicodeDecodeError:
                continue  # Python 2 byte strings that are not UTF-8: Latin-1 decodes any byte
            except pickle.UnpicklingError as error:
                raise ValueError(f"{path}: refused to unpickle ({error}); this is not a plain REFER refs file. Convert "
                                 f"it to JSON in a trusted environment if you trust it.") from error
            except (EOFError, ValueError, TypeError, IndexError, KeyError) as error:
                raise ValueError(f"{path}: not a readable pickle ({type(error).__name__}: {error}).") from error
    raise ValueError(f"{path}: its strings are neither UTF-8 nor Latin-1.")


def _json_column(row: dict, name: str, path, index: int) -> dict:
    try:
        value = json.loads(row[name]) if isinstance(row[name], str) else row[name]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} row {index}: column {name!r} is not valid JSON ({error}).") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} row {index}: column {name!r} should hold a JSON object, got {type(value).__name__}.")
    return value


def _image_header_size(image, path, index: int) -> tuple[int, int] | None:
    """(height, width) from an embedded image ({"bytes": ...}), None if absent."""
    from PIL import Image

    data = image.get("bytes") if isinstance(image, dict) else None
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return opened.height, opened.width
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} row {index}: the embedded image cannot be read ({error}).") from error


def _lmms_eval_ref(row: dict, path, index: int) -> dict:
    size = _image_header_size(row.get("image"), path, index)
    image = {"id": row.get("file_name"), "file_name": row.get("file_name")}
    if size is not None:
        image.update(height=size[0], width=size[1])
    segmentation = row.get("segmentation")
    annotation = {"id": row.get("question_id"), "bbox": row.get("bbox"),
                  "segmentation": [list(segmentation)] if segmentation is not None and len(segmentation) else None}
    answers = row.get("answer") or []
    answers = [answers] if isinstance(answers, str) else list(answers)
    return {"ref_id": row.get("question_id"), "ann_id": row.get("question_id"), "image_id": row.get("file_name"),
            "sentences": [{"sent": text} for text in answers], "_annotation": annotation, "_image": image}


def _parquet_refs(path) -> list[dict]:
    from datasets import Dataset

    rows = Dataset.from_parquet(str(path)).to_list()
    if not rows:
        return []
    columns = set(rows[0])
    if {"question_id", "answer", "bbox"} <= columns:  # lmms-eval export
        return [_lmms_eval_ref(row, path, index) for index, row in enumerate(rows)]
    for index, row in enumerate(rows):
        if isinstance(row.get("sentences"), str):
            row["sentences"] = json.loads(row["sentences"])
        if {"raw_anns", "raw_image_info"} <= columns:  # REFER export with its annotation and image
            row["_annotation"] = _json_column(row, "raw_anns", path, index)
            row["_image"] = _json_column(row, "raw_image_info", path, index)
    return rows


def refs_need_instances(refs: list[dict]) -> bool:
    """Whether the refs point into a COCO instances file (REFER layout) rather than carrying their data."""
    return any(isinstance(ref, dict) and "_annotation" not in ref for ref in refs)


def load_refs(refs_path, allow_pickle: bool = False) -> list[dict]:
    """The refs of a JSON, parquet or (with `allow_pickle`) REFER pickle file, as a list (see the module
    docstring for the layouts)."""
    suffix = Path(refs_path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(
                f"{refs_path} is a Python pickle. It is read only with allow_pickle=True (spec key `allow_pickle: "
                f"true`), by a restricted unpickler that builds plain data and refuses anything else; or convert it "
                f"once to JSON (a list of refs with ref_id, ann_id, image_id, split, sentences[].sent) or parquet.")
        refs = load_plain_pickle(refs_path)
    elif suffix == ".parquet":
        refs = _parquet_refs(refs_path)
    else:
        from .readers import _read_json

        refs = _read_json(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs (ref_id, ann_id, image_id, split, sentences), "
                         f"got {type(refs).__name__}.")
    return refs
