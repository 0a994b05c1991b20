"""Multiple-choice video benchmarks in the common schema: MVBench, Video-MME, MLVU and a generic json/jsonl.

Every row is a `text` sample: `query` the question, `options` the option texts in letter order (letters
stripped), `answer` the correct letter, and one user turn holding the prompt as the benchmark's own evaluation
code builds it (`CHOICE_PROMPTS`, per benchmark and convention). `meta` keeps what the accuracy breakdowns
need (`benchmark`, `convention`, `task_type`, `category`, `duration_class`, `question_id`); the answer
extraction that goes with each prompt is in `tpo.training.multiple_choice`.

Conventions (`convention=`):
- "official": the prompt of the benchmark's release (MVBench: VideoChat2's `mvbench.ipynb`; MLVU: its
  `choice_bench.py`; Video-MME: its README, without subtitles, the setting TPO reports), answers read as
  that code reads them.
- "lmms_eval": lmms-eval's prompts and answer reading for the same benchmark.
Where they differ from each other and from this project's rule (an unreadable answer is wrong), the
differences are listed in `tpo.training.multiple_choice`.

The media are placed before the prompt text by the processor (the model's chat template decides the rest);
MVBench and MLVU put their system sentence before the video, here it opens the user turn after it.

Bad input raises a ValueError naming the file and record: a missing field, options that are not lettered
where the format letters them (Video-MME's "A. ..."), an answer that is not one of the options. A benchmark
with a broken record is not scored partially.
"""

import json
import logging
import math
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from .readers import _from_generator, _read_json, _signature
from .schema import empty_sample, valid_span

logger = logging.getLogger(__name__)

OPTION_LETTERS = string.ascii_uppercase
CONVENTIONS = ("official", "lmms_eval")
VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv", ".webm", ".avi")


@dataclass(frozen=True)
class ChoicePrompt:
    """How a benchmark asks a multiple-choice question, under one convention.

    The user turn is `preamble + question_format.format(question=..., options=...) + suffix`, each option
    rendered with `option_format` (`{letter}`, `{option}`) and joined by newlines; the model's answer starts
    after `answer_prefix` (the start of the assistant turn, "" for none). `extraction` names the answer reader
    (`tpo.training.multiple_choice.EXTRACTORS`); `drops_empty_answers`: the convention leaves questions with an
    empty answer out of the accuracy's denominator (lmms-eval's MVBench) instead of counting them wrong.
    """

    preamble: str
    question_format: str
    option_format: str
    suffix: str
    answer_prefix: str
    extraction: str
    drops_empty_answers: bool = False

    def render(self, question: str, options: list[str]) -> str:
        lines = "\n".join(self.option_format.format(letter=OPTION_LETTERS[i], option=option)
                          for i, option in enumerate(options))
        return self.preamble + self.question_format.format(question=question, options=lines) + self.suffix


_MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                   "movement of objects, and the action and pose of persons. Based on your observations, select the "
                   "best option that accurately addresses the question.\n")
_MLVU_SYSTEM = ("Carefully watch this video and pay attention to every detail. Based on your observations, select the "
                "best option that accurately addresses the question.\n")
_VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video{subs}. "
                         "Respond with only the letter (A, B, C, or D) of the correct option.\n")
_LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_BEST_OPTION = ChoicePrompt("", "Question: {question}\nOptions:\n{options}", "({letter}) {option}",
                            "\nOnly give the best option.", "Best option:(", "")
_LMMS_EVAL_MCQ = ChoicePrompt("", "Question:{question}\nOption:\n{options}\n", "({letter}) {option}",
                              _LETTER_INSTRUCTION, "", "lmms_eval_mcq", drops_empty_answers=True)
CHOICE_PROMPTS = {
    ("mvbench", "official"): ChoicePrompt(**{**_BEST_OPTION.__dict__, "preamble": _MVBENCH_SYSTEM,
                                             "extraction": "mvbench"}),
    ("mvbench", "lmms_eval"): _LMMS_EVAL_MCQ,
    ("mlvu", "official"): ChoicePrompt(**{**_BEST_OPTION.__dict__, "preamble": _MLVU_SYSTEM, "extraction": "mlvu"}),
    # lmms-eval's MLVU data holds the options inside the question; here they follow it, "(A) ..." a line
    ("mlvu", "lmms_eval"): ChoicePrompt("\n", "{question}\n{options}", "({letter}) {option}",
                                        "\nOnly give the best option.\n\nBest option: (", "", "videomme"),
    ("videomme", "official"): ChoicePrompt(_VIDEOMME_INSTRUCTION.format(subs=""), "{question}\n{options}",
                                           "{letter}. {option}", "\nThe best answer is:", "", "videomme"),
    # lmms-eval keeps "and the subtitles" in its prompt without subtitles too
    ("videomme", "lmms_eval"): ChoicePrompt(_VIDEOMME_INSTRUCTION.format(subs=" and the subtitles"),
                                            "{question}\n{options}", "{letter}. {option}", "\nThe best answer is:", "",
                                            "videomme"),
    ("generic", "official"): ChoicePrompt("", "{question}\n{options}", "({letter}) {option}",
                                          "\n" + _LETTER_INSTRUCTION, "", "lenient"),
    ("generic", "lmms_eval"): _LMMS_EVAL_MCQ,
}


def choice_prompt(benchmark: str, convention: str) -> ChoicePrompt:
    """The `ChoicePrompt` of a benchmark ("mvbench", "videomme", "mlvu", "generic") under a convention."""
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; choose one of {list(CONVENTIONS)}.")
    if (benchmark, convention) not in CHOICE_PROMPTS:
        known = sorted({b for b, _ in CHOICE_PROMPTS})
        raise ValueError(f"No multiple-choice prompt for benchmark {benchmark!r}; known: {known}.")
    return CHOICE_PROMPTS[(benchmark, convention)]


def _choice_row(*, sample_id: str, source: str, split: str, benchmark: str, convention: str, question: str,
                options: list[str], answer: str, media_type: str, media_path: str = "", frame_paths=(),
                fps: float = 0.0, duration_seconds: float = 0.0, clip_seconds=(), meta: dict) -> dict:
    prompt = choice_prompt(benchmark, convention).render(question, options)
    return empty_sample(
        id=sample_id, source=source, split=split, task="text", media_type=media_type, media_path=media_path,
        frame_paths=list(frame_paths), query=question, conversations=[{"role": "user", "content": prompt}],
        options=list(options), answer=answer, fps=fps, duration_seconds=duration_seconds,
        clip_seconds=list(clip_seconds), meta={"benchmark": benchmark, "convention": convention, **meta},
    )


def _require(record, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with {list(fields)}, got {type(record).__name__}.")
    missing = [name for name in fields if name not in record or record[name] is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; every question needs {list(fields)}.")


def _options(values, where: str) -> list[str]:
    if not isinstance(values, list) or len(values) < 2 or len(values) > len(OPTION_LETTERS):
        raise ValueError(f"{where}: options must be a list of 2 to {len(OPTION_LETTERS)} texts, got {values!r}.")
    return [str(v) for v in values]


def _letter_of_text(answer, options: list[str], where: str) -> str:
    """The letter of the option whose text is `answer` (MVBench, MLVU: the answer is a candidate's text)."""
    if answer not in options:
        raise ValueError(f"{where}: the answer {answer!r} is not one of the options {options}.")
    return OPTION_LETTERS[options.index(answer)]


def _check_letter(letter, options: list[str], where: str) -> str:
    letter = str(letter).strip()
    allowed = OPTION_LETTERS[: len(options)]
    if len(letter) != 1 or letter not in allowed:
        raise ValueError(f"{where}: the answer letter {letter!r} is outside the options ({', '.join(allowed)}).")
    return letter


_LETTERED = re.compile(r"^\s*[(\[]?([A-Z])[)\].:]\s*(.*)$", re.DOTALL)


def _strip_letters(options: list[str], where: str, required: bool) -> list[str]:
    """Option texts without their "A. " / "(A) " / "A) " prefixes. `required`: every option must carry its letter
    in order (Video-MME); otherwise options are stripped only when all of them carry their letters in order."""
    matches = [_LETTERED.match(option) for option in options]
    lettered = [m is not None and m.group(1) == OPTION_LETTERS[i] for i, m in enumerate(matches)]
    if all(lettered):
        return [m.group(2).strip() for m in matches]
    if required:
        bad = lettered.index(False)
        raise ValueError(f"{where}: option {bad + 1} {options[bad]!r} is not lettered; expected it to start with "
                         f"'{OPTION_LETTERS[bad]}. ' (the options must be lettered A, B, C, ... in order).")
    return options


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; choose one of {list(CONVENTIONS)}.")


# --------------------------------------------------------------------------------------------------
# MVBench
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MVBenchTask:
    """One MVBench task: its question file (`json/<file>`), the folder of its media under `video/`, whether
    the media are video files or frame folders, and whether its questions give a `start`/`end` bound."""

    json_file: str
    folder: str
    media: str
    bounded: bool
    name: str


MVBENCH_TASKS = {
    "action_sequence": MVBenchTask("action_sequence.json", "star/Charades_v1_480", "video", True, "Action Sequence"),
    "action_prediction": MVBenchTask("action_prediction.json", "star/Charades_v1_480", "video", True,
                                     "Action Prediction"),
    "action_antonym": MVBenchTask("action_antonym.json", "ssv2_video", "video", False, "Action Antonym"),
    "fine_grained_action": MVBenchTask("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False,
                                       "Fine-grained Action"),
    "unexpected_action": MVBenchTask("unexpected_action.json", "FunQA_test/test", "video", False, "Unexpected Action"),
    "object_existence": MVBenchTask("object_existence.json", "clevrer/video_validation", "video", False,
                                    "Object Existence"),
    "object_interaction": MVBenchTask("object_interaction.json", "star/Charades_v1_480", "video", True,
                                      "Object Interaction"),
    "object_shuffle": MVBenchTask("object_shuffle.json", "perception/videos", "video", False, "Object Shuffle"),
    "moving_direction": MVBenchTask("moving_direction.json", "clevrer/video_validation", "video", False,
                                    "Moving Direction"),
    "action_localization": MVBenchTask("action_localization.json", "sta/sta_video", "video", True,
                                       "Action Localization"),
    "scene_transition": MVBenchTask("scene_transition.json", "scene_qa/video", "video", False, "Scene Transition"),
    "action_count": MVBenchTask("action_count.json", "perception/videos", "video", False, "Action Count"),
    "moving_count": MVBenchTask("moving_count.json", "clevrer/video_validation", "video", False, "Moving Count"),
    "moving_attribute": MVBenchTask("moving_attribute.json", "clevrer/video_validation", "video", False,
                                    "Moving Attribute"),
    "state_change": MVBenchTask("state_change.json", "perception/videos", "video", False, "State Change"),
    "fine_grained_pose": MVBenchTask("fine_grained_pose.json", "nturgbd", "video", False, "Fine-grained Pose"),
    "character_order": MVBenchTask("character_order.json", "perception/videos", "video", False, "Character Order"),
    "egocentric_navigation": MVBenchTask("egocentric_navigation.json", "vlnqa", "video", False,
                                         "Egocentric Navigation"),
    "episodic_reasoning": MVBenchTask("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frames", True,
                                      "Episodic Reasoning"),
    "counterfactual_inference": MVBenchTask("counterfactual_inference.json", "clevrer/video_validation", "video", False,
                                            "Counterfactual Inference"),
}
MVBENCH_FRAME_FPS = 3.0  # TVQA frame folders (frames_fps3_hq), numbered from 00001.jpg
MVBENCH_LATER_FOLDER = "data0613"  # the Hugging Face release's folder of media added later (clevrer, star)


def _mvbench_media_path(video_root: Path, folder: str, name: str) -> Path:
    path = video_root / folder / name
    later = video_root / MVBENCH_LATER_FOLDER / folder / name
    return later if not path.exists() and later.exists() else path


def _mvbench_frames(folder: Path, bound, where: str) -> list[str]:
    """Frame files of a TVQA frame folder within `bound` (seconds), as MVBench's reader picks them: frames are
    numbered from 1 at 3 fps, the bound covers round(start * fps) .. round(end * fps) (clamped to the folder)."""
    if not folder.is_dir():
        return []
    count = len([f for f in os.listdir(folder) if f.endswith(".jpg")])
    first, last = 1, count
    if bound is not None:
        first = max(1, round(bound[0] * MVBENCH_FRAME_FPS))
        last = min(round(bound[1] * MVBENCH_FRAME_FPS), count)
        if last < first:
            logger.warning("%s: the bound %s s holds no frame of %s (%d frames); using the whole folder.",
                           where, list(bound), folder, count)
            first, last = 1, count
    return [str(folder / f"{index:05d}.jpg") for index in range(first, last + 1)]


def _candidate_questions(path: Path):
    """(index, record, where, options, answer letter) of a question file whose options are `candidates` and whose
    answer is a candidate's text (MVBench, MLVU)."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of questions.")
    for index, record in enumerate(records):
        where = f"{path} record {index}"
        _require(record, ("video", "question", "candidates", "answer"), where)
        options = _options(record["candidates"], where)
        yield index, record, where, options, _letter_of_text(record["answer"], options, where)


def _question_files(paths: list[Path], benchmark: str, layout: str) -> list[Path]:
    missing = [str(f) for f in paths if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{benchmark} question file(s) not found: {missing}; `root` must hold {layout} (or "
                                "choose the tasks you have with `tasks`).")
    return paths


def _mvbench_rows(root, tasks, split, convention, use_bounds, signature):
    root = Path(root)
    for key in json.loads(tasks):
        task = MVBENCH_TASKS[key]
        for index, record, where, options, letter in _candidate_questions(root / "json" / task.json_file):
            bound = None
            if task.bounded and use_bounds:
                _require(record, ("start", "end"), where)
                bound = (float(record["start"]), float(record["end"]))
            media = _mvbench_media_path(root / "video", task.folder, str(record["video"]))
            fields = {"media_type": "video", "media_path": str(media)}
            if task.media == "frames":
                fields = {"media_type": "frames", "media_path": str(media), "fps": MVBENCH_FRAME_FPS,
                          "frame_paths": _mvbench_frames(media, bound, where)}
            elif bound is not None:
                if not bound[0] < bound[1]:
                    logger.warning("%s: the bound %s s is empty; using the whole video.", where, list(bound))
                else:
                    fields["clip_seconds"] = [max(bound[0], 0.0), bound[1]]
            yield _choice_row(sample_id=f"mvbench-{key}-{index}", source="mvbench", split=split, benchmark="mvbench",
                              convention=convention, question=str(record["question"]), options=options, answer=letter,
                              meta={"task_type": key, "question_id": f"{key}-{index}", "video": record["video"]},
                              **fields)


def read_mvbench(root: str, tasks: list[str] | tuple[str, ...] | None = None, split: str = "test",
                 convention: str = "official", use_bounds: bool = True, cache_dir: str | None = None) -> Dataset:
    """MVBench (OpenGVLab/MVBench): `root/json/<task>.json`, lists of `{video, question, candidates, answer}`
    (`answer` the text of a candidate; `start`, `end` in seconds for the bounded tasks), media under
    `root/video/<folder>/` per `MVBENCH_TASKS` (the evaluation notebook's table; `video/data0613/<folder>` is
    looked in for media the Hugging Face release added later). Episodic Reasoning reads TVQA frame folders at
    3 fps restricted to the bound; the bounded video tasks keep their bound as `clip_seconds`, so that frames
    are sampled inside it (pass `use_bounds=False` for the pre-cut segment videos of lmms-eval's copy).
    Rows: ids `mvbench-<task>-<index>`, `meta.task_type` the task key. `tasks`: a subset of the 20 task keys."""
    _check_convention(convention)
    tasks = list(tasks or MVBENCH_TASKS)
    unknown = [t for t in tasks if t not in MVBENCH_TASKS]
    if unknown:
        raise ValueError(f"Unknown MVBench task(s) {unknown}; the tasks are {sorted(MVBENCH_TASKS)}.")
    files = _question_files([Path(root) / "json" / MVBENCH_TASKS[t].json_file for t in tasks], "MVBench",
                            "json/<task>.json")
    return _from_generator(_mvbench_rows, cache_dir, root=str(root), tasks=json.dumps(tasks), split=split,
                           convention=convention, use_bounds=bool(use_bounds), signature=_signature(*files))


# --------------------------------------------------------------------------------------------------
# Video-MME
# --------------------------------------------------------------------------------------------------
VIDEOMME_DURATIONS = ("short", "medium", "long")


def _read_records(path: Path) -> list:
    """Records of a parquet, json (a list) or jsonl file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path} line {line_number}: not valid JSON ({error}).") from error
        return records
    records = _read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records.")
    return records


def _media_file(media_dir: str, name: str, extensions: tuple[str, ...]) -> str:
    base = os.path.join(media_dir, name)
    if os.path.splitext(name)[1]:
        return base
    return next((base + e for e in extensions if os.path.exists(base + e)), base + extensions[0])


def _videomme_rows(path, video_dir, split, convention, durations, signature):
    path = Path(path)
    wanted = json.loads(durations)
    for index, record in enumerate(_read_records(path)):
        where = f"{path} record {index}"
        _require(record, ("videoID", "question", "options", "answer"), where)
        options = _strip_letters(_options(list(record["options"]), where), where, required=True)
        letter = _check_letter(record["answer"], options, where)
        duration = record.get("duration")
        if duration is not None and duration not in VIDEOMME_DURATIONS:
            raise ValueError(f"{where}: duration {duration!r} is not one of {list(VIDEOMME_DURATIONS)}.")
        if wanted and duration not in wanted:
            continue
        question_id = str(record.get("question_id", index))
        yield _choice_row(
            sample_id=f"videomme-{question_id}", source="videomme", split=split, benchmark="videomme",
            convention=convention, question=str(record["question"]), options=options, answer=letter,
            media_type="video", media_path=_media_file(video_dir, str(record["videoID"]), VIDEO_EXTENSIONS),
            meta={"task_type": record.get("task_type"), "category": record.get("domain"),
                  "sub_category": record.get("sub_category"), "duration_class": duration, "question_id": question_id,
                  "video_id": record.get("video_id"), "videoID": record["videoID"]},
        )


def read_videomme(annotations: str, video_dir: str, split: str = "test", convention: str = "official",
                  durations: list[str] | tuple[str, ...] | None = None, cache_dir: str | None = None) -> Dataset:
    """Video-MME (lmms-lab/Video-MME): `videomme/test-00000-of-00001.parquet` (or the same records as json /
    jsonl) with `video_id, duration (short|medium|long), domain, sub_category, videoID, question_id, task_type,
    question, options ["A. ...", "B. ...", ...], answer ("A")`; videos `video_dir/<videoID>.mp4`. Without
    subtitles (the setting TPO reports). `durations` keeps some duration classes. Rows: ids
    `videomme-<question_id>`; `meta`: task_type, category (domain), sub_category, duration_class."""
    _check_convention(convention)
    unknown = [d for d in durations or () if d not in VIDEOMME_DURATIONS]
    if unknown:
        raise ValueError(f"Unknown Video-MME duration(s) {unknown}; choose from {list(VIDEOMME_DURATIONS)}.")
    return _from_generator(_videomme_rows, cache_dir, path=str(annotations), video_dir=str(video_dir), split=split,
                           convention=convention, durations=json.dumps(list(durations or [])),
                           signature=_signature(annotations))


# --------------------------------------------------------------------------------------------------
# MLVU
# --------------------------------------------------------------------------------------------------
# multiple-choice tasks of the dev set: question file json/<N>_<task>.json, videos video/<N>_<task>/ (the
# generation tasks 8_sub_scene and 9_summary have no options)
MLVU_TASKS = {"plotQA": "1_plotQA", "needle": "2_needle", "ego": "3_ego", "count": "4_count", "order": "5_order",
              "anomaly_reco": "6_anomaly_reco", "topic_reasoning": "7_topic_reasoning"}
MLVU_GENERATION_TASKS = ("sub_scene", "summary")


def _mlvu_rows(root, tasks, split, convention, signature):
    root = Path(root)
    for key in json.loads(tasks):
        stem = MLVU_TASKS[key]
        for index, record, where, options, letter in _candidate_questions(root / "json" / f"{stem}.json"):
            duration = record.get("duration")
            try:
                duration = float(duration) if duration is not None else 0.0
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where}: duration {duration!r} is not a number of seconds.") from error
            if not math.isfinite(duration) or duration < 0:
                raise ValueError(f"{where}: duration {duration!r} is not a number of seconds >= 0.")
            yield _choice_row(
                sample_id=f"mlvu-{key}-{index}", source="mlvu", split=split, benchmark="mlvu", convention=convention,
                question=str(record["question"]), options=options, answer=letter, media_type="video",
                media_path=str(root / "video" / stem / str(record["video"])), duration_seconds=duration,
                meta={"task_type": str(record.get("question_type", key)), "question_id": f"{key}-{index}",
                      "video": record["video"]},
            )


def read_mlvu(root: str, tasks: list[str] | tuple[str, ...] | None = None, split: str = "dev",
              convention: str = "official", cache_dir: str | None = None) -> Dataset:
    """MLVU (dev set, MVLU/MLVU): `root/json/<N>_<task>.json`, lists of `{video, duration, question, candidates,
    answer, question_type}` (`answer` the text of a candidate), videos `root/video/<N>_<task>/<video>`. The seven
    multiple-choice tasks (`MLVU_TASKS`; M-Avg is their mean accuracy); the generation tasks (sub_scene, summary)
    are not multiple choice and are refused. Rows: ids `mlvu-<task>-<index>`, `meta.task_type` the question type."""
    _check_convention(convention)
    tasks = list(tasks or MLVU_TASKS)
    generation = [t for t in tasks if t in MLVU_GENERATION_TASKS]
    if generation:
        raise ValueError(f"MLVU task(s) {generation} are generation tasks (no options), not multiple choice.")
    unknown = [t for t in tasks if t not in MLVU_TASKS]
    if unknown:
        raise ValueError(f"Unknown MLVU task(s) {unknown}; the multiple-choice tasks are {list(MLVU_TASKS)}.")
    files = _question_files([Path(root) / "json" / f"{MLVU_TASKS[t]}.json" for t in tasks], "MLVU",
                            "json/<N>_<task>.json")
    return _from_generator(_mlvu_rows, cache_dir, root=str(root), tasks=json.dumps(tasks), split=split,
                           convention=convention, signature=_signature(*files))


# --------------------------------------------------------------------------------------------------
# Generic json / jsonl
# --------------------------------------------------------------------------------------------------
CHOICE_FIELDS = {"id": "id", "question": "question", "options": "options", "answer": "answer", "media": "video",
                 "task_type": "task_type", "category": "category", "duration_class": "duration",
                 "start": "start", "end": "end"}
_REQUIRED_CHOICE_FIELDS = ("question", "options", "answer")


def _answer_letter(answer, options: list[str], where: str) -> str:
    """A letter ("B"), an option index (1) or an option's text -> the letter."""
    if isinstance(answer, bool):
        raise ValueError(f"{where}: the answer {answer!r} is neither a letter, an option index nor an option text.")
    if isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise ValueError(f"{where}: the answer index {answer} is outside the {len(options)} options.")
        return OPTION_LETTERS[answer]
    text = str(answer).strip()
    if len(text) == 1 and text in OPTION_LETTERS:
        return _check_letter(text, options, where)
    if text in options:
        return OPTION_LETTERS[options.index(text)]
    raise ValueError(f"{where}: the answer {answer!r} is neither an option letter ({OPTION_LETTERS[:len(options)]}), "
                     f"an option index nor the text of an option.")


def _generic_rows(path, media_dir, fields, media_type, dataset_name, split, convention, signature):
    path = Path(path)
    names = json.loads(fields)
    for index, record in enumerate(_read_records(path)):
        where = f"{path} record {index}"
        required = [names[k] for k in _REQUIRED_CHOICE_FIELDS] + ([names["media"]] if media_type != "none" else [])
        _require(record, tuple(required), where)
        options = _strip_letters(_options(list(record[names["options"]]), where), where, required=False)
        letter = _answer_letter(record[names["answer"]], options, where)
        media = {"media_type": media_type}
        if media_type != "none":
            media["media_path"] = os.path.join(media_dir, str(record[names["media"]]))
        if media_type == "video" and record.get(names["start"]) is not None and record.get(names["end"]) is not None:
            start, end = float(record[names["start"]]), float(record[names["end"]])
            if not valid_span(start, end):
                raise ValueError(f"{where}: the clip ({start}, {end}) s needs 0 <= start < end.")
            media["clip_seconds"] = [start, end]
        meta = {key: record.get(names[key]) for key in ("task_type", "category", "duration_class")}
        question_id = str(record.get(names["id"], index))
        yield _choice_row(sample_id=f"{dataset_name}-{question_id}", source=dataset_name, split=split,
                          benchmark="generic", convention=convention, question=str(record[names["question"]]),
                          options=options, answer=letter, meta={**meta, "question_id": question_id}, **media)


def read_multiple_choice(path: str, media_dir: str = "", fields: dict | None = None, media_type: str = "video",
                         dataset_name: str = "mcq", split: str = "test", convention: str = "official",
                         cache_dir: str | None = None) -> Dataset:
    """Any multiple-choice file: a json list or jsonl of records, field names mapped by `fields` (keys of
    `CHOICE_FIELDS`: id, question, options, answer, media, task_type, category, duration_class, start, end;
    the defaults are the keys' usual names, e.g. {"media": "video_path", "answer": "gt"}). `options`: a list of
    texts (lettered "A. ...", "(A) ...", "A) ..." prefixes are stripped when every option has its letter in
    order); `answer`: a letter, an option index or an option's text; `media` a path under `media_dir` of
    `media_type` ("video", "image" or "none"); optional `start`/`end` seconds (a clip of the video). The prompt
    lists the options "(A) ..." and asks "Answer with the option's letter from the given choices directly.".
    Rows: ids `<dataset_name>-<id or index>`."""
    _check_convention(convention)
    unknown = sorted(set(fields or {}) - set(CHOICE_FIELDS))
    if unknown:
        raise ValueError(f"Unknown field key(s) {unknown} in `fields`; the keys are {sorted(CHOICE_FIELDS)}.")
    if media_type not in ("video", "image", "none"):
        raise ValueError(f"media_type {media_type!r}: choose 'video', 'image' or 'none'.")
    names = {**CHOICE_FIELDS, **(fields or {})}
    return _from_generator(_generic_rows, cache_dir, path=str(path), media_dir=str(media_dir), fields=json.dumps(names),
                           media_type=media_type, dataset_name=dataset_name, split=split, convention=convention,
                           signature=_signature(path))


# format -> (reader, {spec key: reader argument}), next to `tpo.processing.readers.READERS` (`registered_readers`)
BENCHMARK_READERS = {
    "mvbench": (read_mvbench, {"root": "root", "tasks": "tasks", "split": "split", "convention": "convention",
                               "use_bounds": "use_bounds"}),
    "videomme": (read_videomme, {"annotations": "annotations", "video_dir": "video_dir", "split": "split",
                                 "convention": "convention", "durations": "durations"}),
    "mlvu": (read_mlvu, {"root": "root", "tasks": "tasks", "split": "split", "convention": "convention"}),
    "multiple_choice": (read_multiple_choice, {"json": "path", "media_dir": "media_dir", "fields": "fields",
                                               "media_type": "media_type", "dataset_name": "dataset_name",
                                               "split": "split", "convention": "convention"}),
}
