"""Multiple-choice QA accuracy (MVBench style): the option letter chosen by a free-text answer against
the answer letter.

Option letters are A, B, C, ... in the order of the options. `extract_option_letter` reads "B",
"(B)", "(B) red", "B.", "B)", "B: red", "The answer is B", "Answer: (C)", "Best option: (D) ...", and,
when the options are given, the text of exactly one option ("red"). A lone capital followed by a
space and more words ("A man is ...") is not read as a letter. An answer it cannot read is wrong.
"""

import re

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


def _answer_letter(answer, options: list[str] | None, index: int) -> str:
    if isinstance(answer, (int, np.integer)):
        return OPTION_LETTERS[int(answer)]
    letter = extract_option_letter(answer, options)
    if letter is None:
        raise ValueError(f"Question {index}: cannot read an option letter from the reference answer {answer!r}; "
                         f"give a letter (A, B, ...), an option index or '(B) text'.")
    return letter


def mcqa_accuracy(predictions: list[str], answers: list, options: list[list[str]] | None = None,
                  groups: list[str] | None = None) -> dict[str, float]:
    """Multiple-choice accuracy (x100).

    Args:
        predictions: the model's free-text answers.
        answers: the correct letters ("B"), option indices (1) or "(B) text".
        options: optional per question the option texts (lets a bare option text count).
        groups: optional per question a task name (MVBench's 20 tasks): adds `accuracy/<group>` and
            `mean_group_accuracy` (the mean over groups, MVBench's "Avg").
    Returns:
        `{"accuracy": %, "unparsed": % of answers without a readable letter, ...}` (not rounded).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions.")
    if len(answers) == 0:
        raise ValueError("No questions to evaluate.")
    options = options if options is not None else [None] * len(answers)
    chosen = [extract_option_letter(p, o) for p, o in zip(predictions, options)]
    expected = [_answer_letter(a, o, i) for i, (a, o) in enumerate(zip(answers, options))]
    correct = np.array([c == e for c, e in zip(chosen, expected)])
    out = {"accuracy": float(correct.mean() * 100), "unparsed": float(np.mean([c is None for c in chosen]) * 100)}
    if groups is not None:
        if len(groups) != len(answers):
            raise ValueError(f"{len(groups)} groups for {len(answers)} questions.")
        names = np.asarray(groups, dtype=object)
        per_group = {str(g): float(correct[names == g].mean() * 100) for g in dict.fromkeys(groups)}
        out.update({f"accuracy/{g}": v for g, v in per_group.items()})
        out["mean_group_accuracy"] = float(np.mean(list(per_group.values())))
    return out
