"""VQA answer normalisation: the official VQA evaluation's punctuation, number-word, article and
contraction rules, and EvalAI's answer processor built on them (LLaVA's ``m4c_evaluator``).

Hand-written because no well-kept package ships it (the official code is a script in the VQA
repository, not on PyPI); equal scores need its quirks, which are kept and marked below.
"""

from __future__ import annotations

import re

# Number words the official evaluator turns into digits ("none" too: a count of zero).
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset(("a", "an", "the"))
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# The contracted forms of the official table. Its keys are each form with one apostrophe left
# out ("dont" and "don't"; "couldnt've" and "couldn'tve"), which _contractions() rebuilds.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've
should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're
there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd
you'd've you'll you're you've
""".split()


def _contractions() -> dict[str, str]:
    """The official contraction table: each form with one apostrophe dropped -> the form.

    Its oddities are kept: "she's" and "let's" map to themselves (so "shes" and "lets" stay as
    they are), "somebody'd" maps the other way to "somebodyd", and its capitalised "I" forms
    never match lower-cased text, so they are left out.
    """
    table = {}
    for form in _CONTRACTED:
        for i, char in enumerate(form):
            if char == "'":
                table[form[:i] + form[i + 1 :]] = form
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS = _contractions()

# The official period rule removes a period unless a digit follows ("2.5" keeps it). Its
# pattern, "(?!<=\d)(\.)(?!\d)", opens with a mistyped look-behind that never fails; this is
# what it does.
_PERIOD = re.compile(r"\.(?!\d)")
# A comma between digits ("1,000") makes every punctuation mark vanish instead of becoming a space.
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# The official code passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)


def strip_punctuation(text: str) -> str:
    """The official punctuation step: a mark next to a space (or any mark, in a text with a comma
    between digits) is removed, any other mark becomes a space; then periods not before a digit go."""
    out = text
    vanish_all = _DIGIT_COMMA.search(text) is not None
    for mark in PUNCTUATION:
        if vanish_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def digits_and_articles(text: str) -> str:
    """The official word step: lower-case, number words to digits, articles dropped, missing
    apostrophes of contractions put back."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor (LLaVA's ``EvalAIAnswerProcessor``): lower-case, drop ``,`` and
    ``?``, split off ``'s``, then the official punctuation and word steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return digits_and_articles(strip_punctuation(text))


__all__ = ["ARTICLES", "CONTRACTIONS", "NUMBER_WORDS", "digits_and_articles", "normalize_answer", "strip_punctuation"]
