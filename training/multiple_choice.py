"""Multiple-choice video benchmarks: a TPO checkpoint answers the questions read by
`tpo.processing.benchmark_readers`, answers are read as each benchmark's evaluation code reads them, and
accuracy is reported overall and per task type, category and duration class.

Answer reading (`EXTRACTORS`; the prompt of each benchmark ends where its code starts the answer):
- "mvbench" (VideoChat2's `mvbench.ipynb`): the answer follows "Best option:(", "(" is put back and the first
  word of the first line is the option, "(B)", "B)", "(B", "B" or "(B)." reading as B.
- "mlvu" (MLVU's `choice_bench.py`): the answer follows "Best option:("; the text before the first ")" must be
  exactly a letter (case-sensitive).
- "videomme" (Video-MME's `eval_your_results.py`, also lmms-eval's Video-MME and MLVU): the answer prefixes
  ("The best answer is", ...) are removed and the first capital A, B, C or D anywhere is the letter ("A person
  ..." reads as A); an answer without one is unread. The official list lacks two
  commas, so "The best option is" and "Best option:" are removed only when followed by "The correct option is"
  / "Best answer:"; that is kept.
- "lmms_eval_mcq" (lmms-eval's MVBench `mcq_acc`): "B. text" reads as B; otherwise punctuation is stripped and
  the first standalone letter A-E in any case is the letter (a lowercase "a" is A).
- "lenient" (the generic prompt): `tpo.training.metrics.extract_option_letter` (letters, "(B)", "Answer: B", or
  exactly one option's text).

Where conventions differ on unreadable answers: this project counts every question, an answer it cannot read
is wrong (`accuracy`). lmms-eval's MVBench leaves empty answers out of its denominator (the "lmms_eval"
convention does the same); Video-MME's own script leaves unread answers out of its denominator and MVBench's own
check accepts an empty answer for any option: both would give a higher number. Every result also reports
`unanswered` and `accuracy_of_answered` (unread answers left out), so any of these numbers can be compared.
"""

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..modeling_tpo.configuration_tpo import IGNORE_INDEX
from ..processing.benchmark_readers import OPTION_LETTERS, choice_prompt
from ..processing.collator_tpo import collate_encoded
from ..processing.pipeline import MediaError, load_media, probe_media
from .metrics import extract_option_letter, mcqa_accuracy

logger = logging.getLogger(__name__)

BREAKDOWNS = ("task_type", "category", "duration_class")


# ---------------------------------------------------------------------------------------------------
# Answer reading
# ---------------------------------------------------------------------------------------------------
def _in_options(letter: str | None, options: list[str]) -> str | None:
    return letter if letter is not None and letter in OPTION_LETTERS[: len(options)] else None


def read_mvbench_answer(response: str, options: list[str]) -> str | None:
    """MVBench: "(" + the first line of the answer; its first word names the option."""
    words = ("(" + response.strip().split("\n")[0]).split()
    first = words[0].lower() if words else ""
    boxed = re.match(r"^\((\w)\)", first)
    letter = boxed.group(1) if boxed else first.strip("().")
    return _in_options(letter.upper(), options) if len(letter) == 1 else None


def read_mlvu_answer(response: str, options: list[str]) -> str | None:
    """MLVU: the text before the first ")" is the letter, exactly."""
    text = response.strip()
    text = text[: text.index(")")] if ")" in text else text
    return _in_options(text, options)


# The official list of Video-MME (and lmms-eval): two missing commas join four prefixes into two strings.
_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option is" "The correct option is", "Best answer:" "Best option:")


def read_videomme_answer(response: str, options: list[str]) -> str | None:
    """Video-MME: prefixes removed; the first capital A-D, unless the answer is over 10 words without one."""
    text = response.strip()
    for prefix in _VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    match = re.search(r"[ABCD]", text)  # (the official "over 10 words without A-D" rule changes nothing)
    return _in_options(match.group(0), options) if match else None


_LMMS_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                     "?", "!")


def read_lmms_eval_answer(response: str, options: list[str]) -> str | None:
    """lmms-eval's MVBench: "B. text" -> B; else, punctuation stripped, the first standalone letter A-E in any case."""
    lettered = re.match(r"^([A-E])\.\s*(.+)$", response.strip(), re.IGNORECASE | re.DOTALL)
    if lettered:
        return lettered.group(1).upper()
    text = response.replace("\n", " ").replace("\t", " ").strip()
    digits_comma = re.search(r"(\d)(,)(\d)", text) is not None
    for mark in _LMMS_PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        text = text.replace(mark, "" if spaced or digits_comma else " ")
    text = re.sub(r"\.(?!\d)", "", text).strip().strip("'\"()").strip().lower()
    letter = re.search(r"\b([a-e])\b", text)
    return letter.group(1).upper() if letter else None


def read_lenient_answer(response: str, options: list[str]) -> str | None:
    return extract_option_letter(response, options)


EXTRACTORS = {"mvbench": read_mvbench_answer, "mlvu": read_mlvu_answer, "videomme": read_videomme_answer,
              "lmms_eval_mcq": read_lmms_eval_answer, "lenient": read_lenient_answer}


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------
@dataclass
class ChoiceAnswer:
    """One question answered: the model's `response` (after the prompt's answer prefix), the `letter` read from
    it (None: unread), the correct `answer`, and the breakdown keys."""

    id: str
    response: str
    letter: str | None
    answer: str
    options: list[str]
    question_id: str = ""
    drops_empty: bool = False  # the convention leaves this question out when the answer is empty
    groups: dict = field(default_factory=dict)  # task_type, category, duration_class (None when unknown)
    error: str | None = None  # why no answer was produced (unreadable media), counted as unanswered


def score_choices(answers: list[ChoiceAnswer]) -> dict:
    """Accuracy (x100) over the questions the convention counts, and per task type / category / duration class.

    Returns `accuracy`, `questions` (counted), `dropped_empty` (left out by the convention), `unanswered`
    (counted, unread: wrong), `media_errors`, `accuracy_of_answered` (unread ones left out), and for each
    breakdown present `<breakdown>/<value>` accuracies plus `mean_<breakdown>_accuracy` (MVBench's "Avg" and
    MLVU's M-Avg are `mean_task_type_accuracy`).
    """
    if not answers:
        raise ValueError("No question to score.")
    counted = [a for a in answers if not (a.drops_empty and not a.response.strip() and a.error is None)]
    if not counted:
        raise ValueError("Every answer is empty and the convention leaves empty answers out: nothing to score.")
    result = {"questions": len(counted), "dropped_empty": len(answers) - len(counted),
              "unanswered": sum(a.letter is None for a in counted), "media_errors": sum(a.error is not None for a in counted)}

    def accuracy(subset, groups=None) -> dict:
        return mcqa_accuracy([a.letter or "" for a in subset], [a.answer for a in subset], groups=groups)

    result["accuracy"] = accuracy(counted)["accuracy"]
    answered = [a for a in counted if a.letter is not None]
    result["accuracy_of_answered"] = accuracy(answered)["accuracy"] if answered else 0.0
    for name in BREAKDOWNS:
        values = [a.groups.get(name) for a in counted]
        if all(v is None for v in values):
            continue
        per_group = accuracy(counted, groups=[str(v) for v in values])
        result.update({f"{name}/{k[len('accuracy/'):]}": v for k, v in per_group.items() if k.startswith("accuracy/")})
        result[f"mean_{name}_accuracy"] = per_group["mean_group_accuracy"]
    return result


# ---------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------
def _with_answer_prefix(encoded, prefix_ids: list[int]):
    """The encoding with the prompt's answer prefix ("Best option:(") after the generation prompt."""
    n = len(prefix_ids)
    encoded.input_ids = encoded.input_ids + prefix_ids
    encoded.labels = encoded.labels + [IGNORE_INDEX] * n
    encoded.query_token_mask = encoded.query_token_mask + [0] * n
    encoded.frame_token_index = encoded.frame_token_index + [-1] * n
    encoded.mm_token_type_ids = encoded.mm_token_type_ids + [0] * n
    if encoded.visual_token_xy:
        encoded.visual_token_xy = encoded.visual_token_xy + [[-1.0, -1.0]] * n
    return encoded


def _protocol(sample: dict):
    meta = json.loads(sample["meta"] or "{}")
    return meta, choice_prompt(meta.get("benchmark", "generic"), meta.get("convention", "official"))


def _model_inputs(batch: dict, model) -> dict:
    parameter = next(model.parameters())
    out = {}
    for key, value in batch.items():
        if not torch.is_tensor(value):
            continue
        if value.is_floating_point() and key.startswith("pixel_values"):
            value = value.to(dtype=parameter.dtype)
        out[key] = value.to(parameter.device)
    return out


@torch.no_grad()
def answer_choices(model, processor, samples: list[dict], batch_size: int = 8, max_new_tokens: int = 16,
                   media_loader=load_media) -> list[ChoiceAnswer]:
    """Greedy answers of `model` to multiple-choice samples (rows of `tpo.processing.benchmark_readers`), read
    with their benchmark's extractor. A sample whose media cannot be read is answered by nobody: it is kept as
    unanswered (wrong), with the error, and logged."""
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(samples), batch_size):
            results += _answer_batch(model, processor, samples[start : start + batch_size], max_new_tokens, media_loader)
    finally:
        model.train(was_training)
    return results


def _answer_batch(model, processor, samples, max_new_tokens, media_loader) -> list[ChoiceAnswer]:
    answers, prepared = [], []
    for sample in samples:
        meta, prompt = _protocol(sample)
        answer = ChoiceAnswer(id=sample["id"], response="", letter=None, answer=sample["answer"],
                              options=list(sample["options"]), question_id=str(meta.get("question_id", sample["id"])),
                              drops_empty=prompt.drops_empty_answers, groups={name: meta.get(name) for name in BREAKDOWNS})
        answers.append(answer)
        try:
            probed = probe_media(dict(sample))
            encoded = processor.encode(probed, mode="generate")
            media = media_loader(encoded.media, encoded.targets)
        except (MediaError, OSError, ValueError, IndexError) as error:
            answer.error = str(error)
            logger.warning("Question %r: its media cannot be read (%s); counted as unanswered.", sample["id"], error)
            continue
        if prompt.answer_prefix:
            prefix = processor.tokenizer(prompt.answer_prefix, add_special_tokens=False).input_ids
            encoded = _with_answer_prefix(encoded, prefix)
        prepared.append((answer, prompt, encoded, media))
    if prepared:
        batch = collate_encoded(processor, [p[2] for p in prepared], [p[3] for p in prepared], padding_side="left")
        inputs = _model_inputs(batch, model)
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   return_dict_in_generate=False)
        texts = processor.tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for (answer, prompt, _, _), text in zip(prepared, texts):
            answer.response = text
            answer.letter = EXTRACTORS[prompt.extraction](text, answer.options)
    return answers


def write_choice_results(answers: list[ChoiceAnswer], output_dir: str, name: str) -> dict:
    """`<name>_answers.json` (`{"id", "prediction": the letter read or "", "response", ...}`), its ground truth
    `<name>_answers_ground_truth.json` (`{"id", "answer", "options", "task_type"}`, for `evaluate_tpo.py mcqa`,
    which gives the same `accuracy`) and `<name>_accuracy.json` (`score_choices`). Returns the paths and scores."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    records = [{"id": a.id, "question_id": a.question_id, "prediction": a.letter or "", "response": a.response,
                **({"error": a.error} if a.error else {}), **{k: v for k, v in a.groups.items() if v is not None}}
               for a in answers]
    truths = [{"id": a.id, "answer": a.answer, "options": a.options,
               **({"task_type": a.groups["task_type"]} if a.groups.get("task_type") is not None else {})}
              for a in answers]
    scores = score_choices(answers)
    paths = {"answers": root / f"{name}_answers.json", "ground_truth": root / f"{name}_answers_ground_truth.json",
             "accuracy": root / f"{name}_accuracy.json"}
    paths["answers"].write_text(json.dumps(records, indent=1), encoding="utf-8")
    paths["ground_truth"].write_text(json.dumps(truths, indent=1), encoding="utf-8")
    paths["accuracy"].write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"paths": {k: str(v) for k, v in paths.items()}, "scores": scores}
