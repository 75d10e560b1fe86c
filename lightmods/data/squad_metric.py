"""The official SQuAD scores (exact match and token F1), as the v1.1 and v2.0 evaluation scripts define them.

Reported SQuAD numbers are only comparable when they come from exactly these definitions: answers are
normalised (lower case, punctuation and the articles a/an/the removed, whitespace collapsed), each
prediction is scored against every gold answer and the best score is kept, and scores are percentages.
SQuAD 2.0 adds unanswerable questions, whose only gold answer is the empty string, and reports the
answerable (``HasAns``) and unanswerable (``NoAns``) splits separately. This module is plain Python so
it can score a predictions json outside any training loop.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, replace the articles a/an/the by spaces, collapse whitespace."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_match_score(pred: str, gold: str) -> float:
    """1.0 when both strings normalise to the same text, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def f1_score(pred: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings; as in SQuAD 2.0, two empty answers score 1, one empty 0."""
    pred_toks, gold_toks = _tokens(pred), _tokens(gold)
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    overlap = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_toks)
    recall = overlap / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(example: Mapping, version_2: bool) -> list[str]:
    """The gold texts an example is scored against.

    v2 (as its official script): answers that normalise to nothing are dropped, and an example left with
    none has the single gold answer ``""``. v1.1 keeps every answer; an example without any (absent from
    real v1.1 files) also gets ``[""]`` rather than failing.
    """
    texts = list(example["answers"]["text"])
    if version_2:
        texts = [t for t in texts if normalize_answer(t)]
    return texts or [""]


def _best_scores(pred: str, golds: Sequence[str]) -> tuple[float, float]:
    return max(exact_match_score(pred, g) for g in golds), max(f1_score(pred, g) for g in golds)


def _percent_block(exact: Sequence[float], f1: Sequence[float], prefix: str = "") -> dict[str, float]:
    """``exact_match``/``f1``/``total`` for all questions; ``<prefix>exact``/... (the v2 names) for a split."""
    total = len(exact)
    exact_key = f"{prefix}exact" if prefix else "exact_match"
    return {
        exact_key: 100.0 * sum(exact) / total if total else 0.0,
        f"{prefix}f1": 100.0 * sum(f1) / total if total else 0.0,
        f"{prefix}total": float(total),
    }


def squad_scores(
    predictions: Mapping[str, str], examples: Sequence[Mapping], version_2: bool
) -> dict[str, float]:
    """Score ``{question id: predicted text}`` against ``examples`` (rows with ``id`` and ``answers``).

    Returns percentages ``exact_match``, ``f1`` and the count ``total``; with ``version_2`` also
    ``HasAns_exact``, ``HasAns_f1``, ``HasAns_total`` and ``NoAns_*`` (an example is ``HasAns`` when its
    ``answers.text`` list is non-empty), leaving out a split that has no examples.

    A question id missing from ``predictions`` is scored as the empty prediction and logged as a warning.
    The v1.1 script does the same in effect (the question stays in the denominator with score 0); the v2.0
    script skips it from the per-question scores, which makes its split averages fail, so here it counts
    as ``""`` - correct on an unanswerable question, wrong on an answerable one. Predictions for ids that
    are not in ``examples`` are ignored.
    """
    exact: list[float] = []
    f1: list[float] = []
    has_ans: list[bool] = []
    missing = 0
    for ex in examples:
        if ex["id"] not in predictions:
            missing += 1
        pred = predictions.get(ex["id"], "")
        e, f = _best_scores(pred, gold_answers(ex, version_2))
        exact.append(e)
        f1.append(f)
        has_ans.append(bool(ex["answers"]["text"]))
    if missing:
        log.warning(
            "SQuAD scoring: %d of %d questions have no prediction; scored as ''", missing, len(examples)
        )
    scores = _percent_block(exact, f1)
    if version_2:
        for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
            idx = [i for i, h in enumerate(has_ans) if h == wanted]
            if idx:
                scores.update(_percent_block([exact[i] for i in idx], [f1[i] for i in idx], prefix))
    return scores
