"""Checks of what a user hands the example scripts (YAML files, JSON flags, model paths), with errors that
name the file or flag and what to give instead, before any work starts."""

import json
import os
import re
from pathlib import Path

# A hub repo id: `name` or `namespace/name`, letters, digits, `-`, `_`, `.`; no `--` or `..` (hub rules).
_REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def read_yaml_document(path, what: str = "config"):
    """The YAML (or JSON) document in `path`, any type; a missing file, a syntax error (the parser gives line and
    column) or non-UTF-8 bytes raise an error that names the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error}); fix the {what} file.") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); re-save the {what} file as UTF-8.") from None


def read_yaml_file(path, what: str = "config") -> dict:
    """A YAML mapping from `path` (see `read_yaml_document`); empty -> {}."""
    data = read_yaml_document(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} file holds `name: value` lines (a mapping), not a {type(data).__name__}.")
    return data


def parse_json_flag(value: str | None, flag: str) -> dict:
    """The JSON object given to `flag` (None or "" -> {}); bad JSON or a non-object names the flag."""
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag}: not valid JSON ({error}): {value!r}. Give an object, e.g. "
                         f"{flag} '{{\"key\": 1}}' (double quotes inside, single quotes around it in a shell).") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{flag}: expected a JSON object {{...}}, got {type(parsed).__name__} {value!r}.")
    return parsed


def check_model_source(name_or_path: str | None, flag: str) -> None:
    """Refuse, with one clear error, a model that is neither a local folder nor a hub id that can be loaded:
    a path that does not exist, or, offline (HF_HUB_OFFLINE=1), a hub id with no cached copy. (Without this
    the loaders try the hub and end in a chain of tracebacks about repo ids.)"""
    if name_or_path is None or Path(name_or_path).exists():
        return
    hint = "give a folder written by save_pretrained, or a hub id such as 'llava-hf/llava-1.5-7b-hf'"
    looks_local = name_or_path.startswith((".", "~", os.sep)) or not _REPO_ID.match(name_or_path)
    if looks_local:
        raise FileNotFoundError(f"{flag} {name_or_path!r}: no such folder; {hint}.")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise FileNotFoundError(f"{flag} {name_or_path!r}: not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) "
                                f"with no cached copy of it; download it first or {hint}.")
