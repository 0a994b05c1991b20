"""Multiple-choice QA accuracy (MVBench style): the option letter chosen by a free-text answer against
the answer letter.

Option letters are A, B, C, ... in the order of the options. `extract_option_letter` reads "B",
"(B)", "(B) red", "B.", "B)", "B: red", "The answer is B", "Answer: (C)", "Best option: (D) ...", and,
when the options are given, the text of exactly one option ("red"). A lone capital followed by a
space and more words ("A man is ...") is not read as a letter. An answer it cannot read is wrong.

`convention="lmms-eval"` reads answers as lmms-eval's MVBench task does (`mcq_acc`, `mvbench_aggregate_results`)
instead. Where the two differ:

| answer                  | here (default "tpo")          | lmms-eval                                   |
|-------------------------|-------------------------------|---------------------------------------------|
| "a", "(b)"              | not read: wrong               | A, B (case-insensitive)                     |
| "A person is running"   | not read: wrong               | A (any lone letter A-E as a word)           |
| "" (empty answer)       | wrong, in the denominator     | left out of the denominator                 |
| "F" (6 options)         | F                             | not read (letters A-E only)                 |
| "red" (an option text)  | the letter of that option     | not read                                    |
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_END = r"(?=$|[\s.,:;)\]!?])"
_PATTERNS = [
    re.compile(rf"^\s*[(\[]([A-Z])[)\]]"),  # "(B) red", "[B]"
    re.compile(r"^\s*([A-Z])\s*(?:$|[.:,;)\]])"),  # "B", "B.", "B) red", "B: red"
    re.compile(rf"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?\s*[:=]?\s*[(\[]?([A-Z])[)\]]?{_END}"),
    re.compile(r"[(\[]([A-Z])[)\]]"),  # "I pick (C) because ..."
]


def extract_option_letter(text: str | None, options: list[str] | None = None, letters: str | None = None) -> str | None:
    """The option letter a free-text answer chooses, or `None` if it cannot tell.

    Args:
        text: the model's answer.
        options: the option texts in letter order; restricts the letters to `len(options)` and allows
            matching the answer against the option texts.
        letters: the allowed letters (default: as many as there are options, else A-Z).
    """
    if text is None:
        return None
    allowed = letters or (OPTION_LETTERS[: len(options)] if options else OPTION_LETTERS)
    stripped = str(text).strip()
    for pattern in _PATTERNS:
        for match in pattern.finditer(stripped):
            if match.group(1) in allowed:
                return match.group(1)
    if options:
        lowered = stripped.lower().strip(" .")
        exact = [i for i, option in enumerate(options) if option.lower().strip(" .") == lowered]
        if len(exact) == 1:
            return allowed[exact[0]]
        contained = [i for i, option in enumerate(options)
                     if option.strip() and re.search(rf"\b{re.escape(option.lower().strip(' .'))}\b", lowered)]
        if len(contained) == 1:
            return allowed[contained[0]]
    return None


_LMMS_LETTER_DOT = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)  # "b. red"
_LMMS_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                     "?", "!")
_LMMS_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_LMMS_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
_LMMS_PERIOD_COUNT = 32  # lmms-eval passes re.UNICODE (32) as `count` to re.sub: at most 32 periods go
_LMMS_LETTER = re.compile(r"\b([a-e])\b")


def lmms_eval_option_letter(text: str | None, options: list[str] | None = None) -> str | None:
    """The option letter (A-E) lmms-eval's MVBench `mcq_acc` reads from an answer, or `None`.

    "b. red" -> B; otherwise newlines and tabs become spaces, punctuation is removed (next to a space, or
    anywhere when the text has a comma between digits) or replaced by a space, periods not followed by a
    digit are removed, quotes and parentheses stripped from the ends, the text lowercased, and the first
    lone letter a-e (a word of its own) is the answer. `options` is accepted and unused (lmms-eval never
    matches option texts).
    """
    if text is None:
        return None
    match = _LMMS_LETTER_DOT.match(text.strip())
    if match:
        return match.group(1).upper()
    original = text.replace("\n", " ").replace("\t", " ").strip()
    cleaned = original
    for mark in _LMMS_PUNCTUATION:
        spaced = mark + " " in original or " " + mark in original or _LMMS_COMMA_IN_NUMBER.search(original)
        cleaned = cleaned.replace(mark, "" if spaced else " ")
    cleaned = _LMMS_PERIOD.sub("", cleaned, count=_LMMS_PERIOD_COUNT)
    cleaned = cleaned.strip("'").strip('"').strip(")").strip("(").strip().lower()
    match = _LMMS_LETTER.search(cleaned)
    return match.group(1).upper() if match else None


@dataclass(frozen=True)
class AnswerConvention:
    """How free-text answers are read: the reader, and whether empty answers leave the denominator."""

    read_letter: Callable[[str | None, list[str] | None], str | None]
    drop_empty_answers: bool


ANSWER_CONVENTIONS = {
    "tpo": AnswerConvention(read_letter=extract_option_letter, drop_empty_answers=False),
    "lmms-eval": AnswerConvention(read_letter=lmms_eval_option_letter, drop_empty_answers=True),
}


def _answer_letter(answer, options: list[str] | None, index: int) -> str:
    if isinstance(answer, (int, np.integer)):
        return OPTION_LETTERS[int(answer)]
    letter = extract_option_letter(answer, options)
    if letter is None:
        raise ValueError(f"Question {index}: cannot read an option letter from the reference answer {answer!r}; "
                         f"give a letter (A, B, ...), an option index or '(B) text'.")
    return letter


def mcqa_accuracy(predictions: list[str], answers: list, options: list[list[str]] | None = None,
                  groups: list[str] | None = None, convention: str = "tpo") -> dict[str, float]:
    """Multiple-choice accuracy (x100).

    Args:
        predictions: the model's free-text answers (`None`: no answer, wrong).
        answers: the correct letters ("B"), option indices (1) or "(B) text".
        options: optional per question the option texts (lets a bare option text count).
        groups: optional per question a task name (MVBench's 20 tasks): adds `accuracy/<group>` and
            `mean_group_accuracy` (the mean over groups, MVBench's "Avg").
        convention: "tpo" (this module's reading) or "lmms-eval" (its MVBench reading: see the module
            docstring); with "lmms-eval", empty answers leave the denominator and `empty` gives their %.
    Returns:
        `{"accuracy": %, "unparsed": % of answers without a readable letter, ...}` (not rounded).
    """
    if convention not in ANSWER_CONVENTIONS:
        raise ValueError(f"Unknown answer convention {convention!r}; choose one of {list(ANSWER_CONVENTIONS)}.")
    rule = ANSWER_CONVENTIONS[convention]
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions.")
    if len(answers) == 0:
        raise ValueError("No questions to evaluate.")
    options = options if options is not None else [None] * len(answers)
    expected = [_answer_letter(a, o, i) for i, (a, o) in enumerate(zip(answers, options))]
    counted = np.array([not (rule.drop_empty_answers and p == "") for p in predictions])
    if not counted.any():
        raise ValueError(f"Every answer is empty; nothing to evaluate under the {convention!r} convention.")
    chosen = [rule.read_letter(p, o) for p, o in zip(predictions, options)]
    correct = np.array([c == e for c, e in zip(chosen, expected)])[counted]
    unparsed = np.array([c is None for c in chosen])[counted]
    out = {"accuracy": float(correct.mean() * 100), "unparsed": float(unparsed.mean() * 100)}
    if rule.drop_empty_answers:
        out["empty"] = float((~counted).mean() * 100)
    if groups is not None:
        if len(groups) != len(answers):
            raise ValueError(f"{len(groups)} groups for {len(answers)} questions.")
        names = np.asarray(groups, dtype=object)[counted]
        per_group = {str(g): float(correct[names == g].mean() * 100) for g in dict.fromkeys(names.tolist())}
        out.update({f"accuracy/{g}": v for g, v in per_group.items()})
        out["mean_group_accuracy"] = float(np.mean(list(per_group.values())))
    return out
