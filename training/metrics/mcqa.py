"""Multiple-choice QA accuracy (MVBench style): the chosen option letter against the answer letter."""

import re

import numpy as np

_PATTERNS = [
    re.compile(r"^\s*\(?([A-Z])\)?(?:[.:)\s]|$)"),  # "B", "(B) red", "B. red", "B: red"
    re.compile(r"(?:answer|option)\s*(?:is|:)?\s*\(?([A-Z])\)?(?:[.:)\s]|$)", re.IGNORECASE),
    re.compile(r"\(([A-Z])\)"),
]


def extract_option_letter(text: str, options: list[str] | None = None, letters: str = "ABCDEFGH") -> str | None:
    """The option letter a free-text answer chooses: "B", "(B) red", "B.", "The answer is B", or the
    text of exactly one option ("red") when `options` are given; None if it cannot tell."""
    if text is None:
        return None
    stripped = text.strip()
    for pattern in _PATTERNS:
        match = pattern.search(stripped)
        if match and match.group(1).upper() in letters:
            return match.group(1).upper()
    if options:
        lowered = stripped.lower().strip(" .")
        exact = [i for i, option in enumerate(options) if option.lower() == lowered]
        if len(exact) == 1:
            return letters[exact[0]]
        contained = [i for i, option in enumerate(options) if re.search(rf"\b{re.escape(option.lower())}\b", lowered)]
        if len(contained) == 1:
            return letters[contained[0]]
    return None


def mcqa_accuracy(predictions: list[str], answers: list[str], options: list[list[str]] | None = None) -> dict[str, float]:
    """Accuracy x100; an answer whose letter cannot be extracted is wrong."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions.")
    if not answers:
        raise ValueError("No questions to evaluate.")
    options = options or [None] * len(answers)
    chosen = [extract_option_letter(p, o) for p, o in zip(predictions, options)]
    correct = [c is not None and c == a.strip().upper() for c, a in zip(chosen, answers)]
    return {"accuracy": float(np.mean(correct) * 100), "unparsed": float(np.mean([c is None for c in chosen]) * 100)}
