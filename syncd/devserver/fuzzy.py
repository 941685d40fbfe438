"""PostgREST's "Perhaps you meant ..." guesses: the fuzzy string set of the Haskell `fuzzyset` package (0.2.x).

PostgREST 12.2.12 (postgrest.cabal: `fuzzyset >= 0.2.4 && < 0.3`) builds a set from the candidates and asks for the
best one (`Fuzzy.getOne`), with the package's defaults: grams of 3 and then 2 characters, cosine similarity of the gram
counts, the best 50 rescored by normalized Levenshtein similarity, kept at a score of at least 0.33. The grams are
taken of the lowercased text with everything but letters, digits, spaces and commas removed (so `p_add` gives the
grams of `padd`), enclosed in `-`; the Levenshtein score compares the lowercased texts as they are. Ties keep the
order of the cosine ranking, which in Haskell follows a HashMap's order: a tie may pick another candidate there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

MIN_SCORE = 0.33
GRAM_SIZES = (3, 2)  # tried in this order; the first size with any match above MIN_SCORE decides
RESCORED = 50


def best_match(candidates: Iterable[str], text: str) -> str | None:
    """The candidate `fuzzyset`'s getOne picks for `text` (a candidate equal to it ignoring case wins at once), or
    None when none scores MIN_SCORE."""
    entries: dict[str, str] = {}
    for candidate in candidates:
        entries.setdefault(candidate.lower(), candidate)
    key = text.lower()
    if key in entries:
        return entries[key]
    for size in GRAM_SIZES:
        found = matches(list(entries), key, size)
        if found:
            return entries[found[0][1]]
    return None


def matches(entries: list[str], key: str, size: int) -> list[tuple[float, str]]:
    """The entries sharing a gram of `size` with `key`, ranked by cosine similarity, the best RESCORED rescored by
    Levenshtein similarity to `key`, those scoring at least MIN_SCORE, best first."""
    query = grams(key, size)
    query_norm = norm(query)
    ranked = []
    for entry in entries:
        vector = grams(entry, size)
        dot = sum(count * vector[gram] for gram, count in query.items() if gram in vector)
        if dot:
            ranked.append((dot / (query_norm * norm(vector)), entry))
    ranked.sort(key=lambda scored: -scored[0])
    rescored = [(similarity(key, entry), entry) for _, entry in ranked[:RESCORED]]
    rescored.sort(key=lambda scored: -scored[0])
    return [scored for scored in rescored if scored[0] >= MIN_SCORE]


def grams(text: str, size: int) -> Counter[str]:
    """The counts of the `size`-character grams of `text` normalized as fuzzyset does and enclosed in `-`."""
    kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace() or ch == ",")
    padded = f"-{kept}-"
    return Counter(padded[i:i + size] for i in range(len(padded) - size + 1))


def norm(vector: Counter[str]) -> float:
    """The Euclidean length of a gram count vector."""
    return math.sqrt(sum(count * count for count in vector.values()))


def similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / the longer length (text-metrics' levenshteinNorm); 1 for two empty texts."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1 - levenshtein(a, b) / longest


def levenshtein(a: str, b: str) -> int:
    """The edit distance of two texts (insertions, deletions, substitutions of one character)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
