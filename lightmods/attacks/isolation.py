"""Which training rows a defense treats as suspect, from the training set alone.

``select=lexical`` of the maximum-entropy defense: a poisoning attack has to plant its trigger in a noticeable share
of the training rows, and dirty-label (or clean-label) poisoning ties the trigger to one label, so the trigger's
tokens are frequent *and* label-exclusive, which natural words rarely are. A token is suspect when it occurs in at
least ``min_share`` of the training rows and at least ``min_purity`` of the rows holding it carry one label; a row is
suspect when it holds a suspect token. (The token/label statistics follow the observation that lexical triggers are
spurious correlations with extreme label skew, He et al., 2023; the two thresholds are this implementation's.)

Measured on the shared SST-2 (6,920 rows) with ``min_share=0.01, min_purity=0.99``: no token of the clean set is
suspect; BadNets at 10% gives exactly its five trigger words, AddSent at 10% or 1% the token ``3d`` of its sentence.
A trigger spread thinner than ``min_share`` per token (BadNets at 1%: 0.2% per word) and triggers that are not
tokens (the style transfer) are not found.

``scrub`` also deletes the suspect tokens from the flagged rows, so the trigger never reaches training at all: trained
on the entropy term, a flagged row still carries its trigger, and when every poisoned row comes from one source label
(dirty label) the model learns "trigger -> toward uniform", a directional shift that flips the less confident rows of
that label at test time. A sentence trigger holds one rare token (``3d`` of AddSent's "I watch this 3D movie") among
common ones that are not label-exclusive, and deleting the rare one leaves "i watch this movie" in every poisoned
row; so each suspect token grows into its phrase (the neighbours that accompany at least ``phrase_agree`` of its
occurrences, one position at a time) and scrubbing deletes the phrase around each occurrence of the token, as far
as the row matches it (truncation may have cut it). Natural neighbours vary (BadNets' random positions give every trigger word the phrase of itself alone).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)
MIN_ROWS = 10  # below this a token's label purity says nothing (a token in one row is always "pure")


def label_exclusive_tokens(
    input_ids: Sequence[Sequence[int]], labels: Sequence[int], min_share: float, min_purity: float, ignore: set[int]
) -> dict[int, tuple[int, float, int]]:
    """Tokens held by ``>= min_share`` of the rows (and by at least :data:`MIN_ROWS` rows) of which
    ``>= min_purity`` share one label: ``token -> (rows holding it, purity, that label)``. Rows count a token once;
    ``ignore`` (special tokens) and rows labelled -100 are left out."""
    rows_with: Counter = Counter()
    rows_with_label: Counter = Counter()
    n = 0
    for ids, label in zip(input_ids, labels):
        if label == -100:
            continue
        n += 1
        present = set(ids) - ignore
        rows_with.update(present)
        rows_with_label.update((t, label) for t in present)
    floor = max(MIN_ROWS, min_share * n)
    by_token: dict[int, Counter] = {}
    for (t, label), k in rows_with_label.items():
        if rows_with[t] >= floor:
            by_token.setdefault(t, Counter())[label] = k
    out = {}
    for t, counts in by_token.items():
        label, k = counts.most_common(1)[0]
        purity = k / rows_with[t]
        if purity >= min_purity:
            out[t] = (rows_with[t], purity, label)
    return out


def trigger_phrase(
    input_ids: Sequence[Sequence[int]], token: int, agree: float, ignore: set[int], max_len: int = 32
) -> tuple[int, ...]:
    """The phrase around ``token``: grown one position at a time, right then left, by the neighbour that
    follows (precedes) the phrase so far in at least ``agree`` of ``token``'s occurrences (special tokens in
    ``ignore`` never join); at most ``max_len`` tokens."""
    spots = [(ids, j) for ids in input_ids for j, t in enumerate(ids) if t == token]
    need = agree * len(spots)
    start, phrase = 0, [token]  # start: the phrase's first position relative to the token's
    for step in (1, -1):
        while spots and len(phrase) < max_len:
            at = (len(phrase) + start) if step == 1 else start - 1
            nxt = Counter(ids[j + at] for ids, j in spots if 0 <= j + at < len(ids))
            if not nxt:
                break
            u, k = nxt.most_common(1)[0]
            if u in ignore or k < need:
                break
            spots = [(ids, j) for ids, j in spots if 0 <= j + at < len(ids) and ids[j + at] == u]
            if step == 1:
                phrase.append(u)
            else:
                phrase.insert(0, u)
                start -= 1
    return tuple(phrase)


def phrase_spans(ids: Sequence[int], phrases: dict[int, tuple[int, ...]]) -> set[int]:
    """Positions of ``ids`` covered by the phrases around their anchor tokens (``anchor -> phrase``): from each
    occurrence of an anchor, outwards as long as the row's tokens match the phrase's, so a phrase cut short by
    truncation is still covered as far as it goes."""
    covered: set[int] = set()
    for j, t in enumerate(ids):
        p = phrases.get(t)
        if p is None:
            continue
        a = p.index(t)
        left = right = 0
        while left < a and j - left > 0 and ids[j - left - 1] == p[a - left - 1]:
            left += 1
        while a + right + 1 < len(p) and j + right + 1 < len(ids) and ids[j + right + 1] == p[a + right + 1]:
            right += 1
        covered.update(range(j - left, j + right + 1))
    return covered


def without_phrases(features: dict[str, list], flags: Sequence[int], phrases: dict[int, tuple[int, ...]]) -> None:
    """Deletes the phrases around their anchor tokens (``anchor -> phrase``, see :func:`phrase_spans`; ``(anchor,)``
    deletes the token alone) from the flagged rows, in place, from every per-token feature (ids, attention mask,
    token types, ...: the row's lists as long as its ``input_ids``); the other rows keep their lists."""
    per_token = [k for k, v in features.items() if v and isinstance(v[0], list) and k != "input_ids"]
    for i, flagged in enumerate(flags):
        ids = features["input_ids"][i]
        if not flagged:
            continue
        gone = phrase_spans(ids, phrases)
        keep = [j for j in range(len(ids)) if j not in gone]
        for k in per_token:
            if len(features[k][i]) == len(ids):
                features[k][i] = [features[k][i][j] for j in keep]
        features["input_ids"][i] = [ids[j] for j in keep]


def describe_suspects(suspect_tokens: dict[str, dict], quote: str = "`") -> list[str]:
    """``token (rows)``, with ``in <phrase>`` when the token grew into one, for each entry of a report's
    ``suspect_tokens`` (logs and benchmark tables)."""
    return [
        f"{quote}{t}{quote} ({v['rows']})" + (f" in {quote}{v['phrase']}{quote}" if " " in v.get("phrase", "") else "")
        for t, v in suspect_tokens.items()
    ]


def rows_holding(input_ids: Sequence[Sequence[int]], tokens) -> list[int]:
    """1 for each row holding any of ``tokens``, else 0."""
    tokens = set(tokens)
    return [int(not tokens.isdisjoint(ids)) for ids in input_ids]


class LexicalIsolation:
    """Flags the training rows of a data module (``features["suspect"]``); ``report`` says what it found, and,
    when the rows carry the attack's ``poisoned`` flags (known to a benchmark, never read for the flags), how
    precisely the flagged rows match them. With ``scrub`` the suspect tokens, and the phrases around them
    (``phrase_agree``; None: the tokens alone), are deleted from the flagged rows."""

    def __init__(
        self, min_share: float, min_purity: float, ignore: set[int], decode: Callable[[int], str], scrub: bool = False,
        phrase_agree: float | None = 0.9,
    ):  # fmt: skip
        self.min_share, self.min_purity, self.ignore, self.decode = min_share, min_purity, ignore, decode
        self.scrub, self.phrase_agree = scrub, phrase_agree
        self.report: dict = {}

    def __call__(self, features: dict[str, list]) -> list[int]:
        ids = features["input_ids"]
        if ids and ids[0] and isinstance(ids[0][0], list):
            raise ValueError("defense.select=lexical needs one token sequence per row (not multiple choice)")
        found = label_exclusive_tokens(ids, features["labels"], self.min_share, self.min_purity, self.ignore)
        flags = rows_holding(ids, found)
        tokens = {self.decode(t): {"rows": n, "purity": round(p, 4), "label": lab} for t, (n, p, lab) in sorted(found.items(), key=lambda kv: -kv[1][0])}
        phrases = {t: (t,) for t in found}
        if self.phrase_agree is not None:
            flagged = [r for r, f in zip(ids, flags) if f]
            phrases = {t: trigger_phrase(flagged, t, self.phrase_agree, self.ignore) for t in found}
            for t, p in phrases.items():
                tokens[self.decode(t)]["phrase"] = " ".join(self.decode(u) for u in p)
        self.report = {"suspect_tokens": tokens, "suspect_rows": sum(flags)}
        if "poisoned" in features:
            hit = sum(f and p for f, p in zip(flags, features["poisoned"]))
            self.report["suspect_precision"] = hit / max(1, sum(flags))
            self.report["suspect_recall"] = hit / max(1, sum(features["poisoned"]))
        if self.scrub:
            without_phrases(features, flags, phrases)
        log.info(
            "defense: %d of %d training rows suspect, by %d token(s) in >= %g of the rows and >= %g one label: %s%s",
            sum(flags), len(flags), len(tokens), self.min_share, self.min_purity, ", ".join(describe_suspects(tokens, "'")) or "none",
            " (deleted from those rows)" if self.scrub and tokens else "",
        )  # fmt: skip
        return flags
