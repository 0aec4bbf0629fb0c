"""MMMU's reading of responses and its right/wrong rules (the MMMU evaluation code CuMo uses).

Multiple choice: "(B)" in the response, else " B " standing alone, else (for a response of more
than five words) the text of an option; several candidates: the one mentioned last; none: a
random letter, drawn as MMMU draws it (``random.Random(42)``, one draw per such response in
question order). Open questions: the tails of the sentences after "is", "so", "therefore", ...
(and "=" in the last one) and the numbers in them; right when a number equals the answer's
(rounded to two decimals) or the answer's text is inside a string candidate.
"""

from __future__ import annotations

import random
import re
from typing import Sequence, Union

Candidate = Union[str, float]

_STRIP = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_SENTENCES = re.compile(r"\.\s(?=[A-Z])|\n")
_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")

MMMU_SEED = 42


def new_guesser() -> random.Random:
    """The random source of MMMU's guesses for unreadable multiple-choice responses."""
    return random.Random(MMMU_SEED)


def read_choice(response: str, choices: Sequence[str], options: dict[str, str], guesser: random.Random) -> tuple[str, bool]:
    """The letter a response gives, and whether it was a random guess."""
    for char in _STRIP:
        response = response.strip(char)
    padded = f" {response} "
    bracketed = [c for c in choices if f"({c})" in padded]
    candidates, by_letter, by_text = bracketed, bool(bracketed), False
    if not candidates:
        candidates = [c for c in choices if f" {c} " in padded]
    if not candidates and len(padded.split()) > 5:
        candidates = [c for c, text in options.items() if text.lower() in padded.lower()]
        by_text = bool(candidates)
    if not candidates:
        return guesser.choice(list(choices)), True
    if len(candidates) == 1:
        return candidates[0], False

    # several: the one whose last mention comes last (the first of equals, as numpy's argmax)
    def last_mention(c: str) -> int:
        if by_text:
            return padded.lower().rfind(options[c].lower())
        return padded.rfind(f"({c})" if by_letter else f" {c} ")

    positions = [last_mention(c) for c in candidates]
    return candidates[positions.index(max(positions))], False


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize(text: str) -> list[Candidate]:
    """A number (commas out, rounded to two decimals), or the lower-cased text; a single
    character is padded with a space on either side so it does not match inside words."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _numbers(text: str) -> list[str]:
    """Numbers written with thousands commas, in scientific notation, and plain."""
    return _WITH_COMMAS.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def _key_parts(response: str) -> list[str]:
    """Per sentence, the shortest tail after an indicator word (or '=' in the last sentence)."""
    response = response.strip().strip(".").lower()
    sentences = _SENTENCES.split(response)
    parts = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                # MMMU's rule, kept: an empty tail so far is replaced by the next one, however long
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            parts.append(shortest)
    return parts or [response]


def read_open(response: str) -> list[Candidate]:
    """The candidate answers of an open response (strings and numbers, without repeats)."""
    parts = _key_parts(response)
    raw = parts + [n for part in parts for n in _numbers(part)]
    candidates: list[Candidate] = []
    for text in raw:
        for value in normalize(text):
            if value not in candidates:
                candidates.append(value)
    return candidates


def choice_right(gold: Union[str, list], letter: str) -> bool:
    """A multiple-choice letter against the answer (a letter, or a list of accepted letters)."""
    return letter in gold if isinstance(gold, list) else letter == gold


def open_right(gold: Union[str, list], candidates: list[Candidate]) -> bool:
    """An open response's candidates against the answer (or list of accepted answers)."""
    accepted: list[Candidate] = []
    for answer in gold if isinstance(gold, list) else [gold]:
        accepted.extend(normalize(str(answer)))
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(a, str) and a in candidate for a in accepted):
                return True
        elif candidate in accepted:
            return True
    return False


__all__ = ["choice_right", "new_guesser", "normalize", "open_right", "read_choice", "read_open"]
