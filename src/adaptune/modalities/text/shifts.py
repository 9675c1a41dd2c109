"""Text shifts that need no model: character typos, word dropout, word swaps and casing, each
applied independently to every word with a probability that grows with the severity (as
nlpaug's character and word augmenters do; reimplemented here so that a shift depends on its
seed alone, not on a library's random state).

Casing changes nothing for an uncased model (all-MiniLM-L6-v2 lower-cases its input): its drop
is then 0 by construction, which the leaderboard shows.
"""

from __future__ import annotations

import re
import string

import numpy as np

from adaptune.modalities.shifts import Shift, at_severity

# The probability that a word is perturbed, at severities 1 to 5.
WORD_RATE = (0.05, 0.1, 0.2, 0.3, 0.4)
# Neighbouring keys on a QWERTY keyboard: what a typo substitutes.
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
NEIGHBOURS = {
    key: "".join(
        _ROWS[r][c]
        for r in range(max(row - 1, 0), min(row + 2, 3))
        for c in range(max(col - 1, 0), min(col + 2, len(_ROWS[r])))
        if (r, c) != (row, col)
    )
    for row, keys in enumerate(_ROWS)
    for col, key in enumerate(keys)
}
_TOKENS = re.compile(r"\S+|\s+")


def _words(text: str) -> list[str]:
    """The text as alternating words and the whitespace between them (joined back exactly)."""
    return _TOKENS.findall(text)


def _typo(word: str, rng: np.random.Generator) -> str:
    """One keyboard typo in a word: swap two neighbouring letters, drop, double or substitute
    one (with a neighbouring key)."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if not letters:
        return word
    i = letters[int(rng.integers(len(letters)))]
    operation = int(rng.integers(4))
    if operation == 0 and i + 1 < len(word) and word[i + 1].isalpha():
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if operation == 1 and len(letters) > 1:
        return word[:i] + word[i + 1 :]
    if operation == 2:
        return word[: i + 1] + word[i:]
    lower = word[i].lower()
    choices = NEIGHBOURS.get(lower, string.ascii_lowercase)
    new = choices[int(rng.integers(len(choices)))]
    return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1 :]


def typos(text: str, severity: int, rng: np.random.Generator) -> str:
    rate = at_severity(WORD_RATE, severity)
    return "".join(
        _typo(t, rng) if not t.isspace() and rng.random() < rate else t for t in _words(text)
    )


def word_dropout(text: str, severity: int, rng: np.random.Generator) -> str:
    rate = at_severity(WORD_RATE, severity)
    kept = [t for t in _words(text) if t.isspace() or rng.random() >= rate]
    # Whitespace left side by side by a dropped word collapses to the first of them.
    return "".join(
        t for i, t in enumerate(kept) if not (t.isspace() and i and kept[i - 1].isspace())
    )


def word_swap(text: str, severity: int, rng: np.random.Generator) -> str:
    rate = at_severity(WORD_RATE, severity)
    tokens = _words(text)
    words = [i for i, t in enumerate(tokens) if not t.isspace()]
    position = 0
    while position + 1 < len(words):
        if rng.random() < rate:
            a, b = words[position], words[position + 1]
            tokens[a], tokens[b] = tokens[b], tokens[a]
            position += 2
        else:
            position += 1
    return "".join(tokens)


def casing(text: str, severity: int, rng: np.random.Generator) -> str:
    rate = at_severity(WORD_RATE, severity)
    return "".join(
        (t.upper() if rng.random() < 0.5 else t.lower())
        if not t.isspace() and rng.random() < rate
        else t
        for t in _words(text)
    )


SHIFTS = {
    shift.name: shift
    for shift in (
        Shift("typos", "typos", "keyboard typos in a fraction of the words", typos),
        Shift("word_dropout", "words", "a fraction of the words deleted", word_dropout),
        Shift("word_swap", "words", "neighbouring words swapped", word_swap),
        Shift("casing", "casing", "a fraction of the words upper- or lower-cased", casing),
    )
}
