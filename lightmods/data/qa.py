"""Extractive question answering (SQuAD v1.1 / v2.0): read the official json, cut windows, decode answers.

A SQuAD context is often longer than the model's input, so each question + context pair is tokenised into
overlapping windows (``stride`` tokens shared between neighbours), each window being one model input
("feature"). Training labels are the token positions of the answer inside a window, or the first token
(``[CLS]``, position 0) when the window does not hold the whole answer or the question has none. At
evaluation, the start/end logits of all windows of a question are mapped back to character spans of the
context through the tokenizer's offsets, the best valid span wins, and for SQuAD 2.0 it must beat the
"no answer" score (start and end on position 0) by a margin. The layout is the BERT one,
``[CLS] question [SEP] context [SEP]``: the question comes first and only the context is truncated.

Everything here is plain Python over lists (and numpy for the logits), with no Lightning dependency, so
the same code serves a DataModule, a script and the tests. The scores themselves live in
:mod:`lightmods.data.squad_metric`.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lightmods.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CLS_INDEX = 0  # the null-answer position: [CLS] opens every window of a BERT-style question-first pair
CONTEXT_SEQUENCE = 1  # sequence id of the context in a (question, context) pair

Offsets = list[tuple[int, int] | None]


# ---------------------------------------------------------------- reading the official json


def _fail(path: Path, where: str, problem: str) -> DataError:
    return DataError(f"{path}: {where}: {problem}" if where else f"{path}: {problem}")


def _field(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """``obj[key]`` when ``obj`` is a dict holding a value of type ``kind`` there, else a DataError."""
    if not isinstance(obj, dict):
        raise _fail(path, where, f"expected a json object, got {type(obj).__name__}")
    if key not in obj:
        raise _fail(path, where, f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _fail(
            path, where, f"{key!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
        )
    return value


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise _fail(path, "", "file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, "", f"not valid json ({e})") from e


def _read_answers(qa: dict, context: str, path: Path, where: str) -> dict[str, list]:
    """The question's gold answers as ``{"text": [...], "answer_start": [...]}``, each checked against the context."""
    texts: list[str] = []
    starts: list[int] = []
    for i, answer in enumerate(_field(qa, "answers", list, path, where)):
        at = f"{where}, answer {i}"
        text = _field(answer, "text", str, path, at)
        start = _field(answer, "answer_start", int, path, at)
        if not text:
            raise _fail(path, at, "answer text is empty")
        found = context[start : start + len(text)] if 0 <= start < len(context) else None
        if found != text:
            raise _fail(
                path,
                at,
                f"answer_start={start} does not point to the answer text {text!r} in the context "
                f"(found {found!r})",
            )
        texts.append(text)
        starts.append(start)
    return {"text": texts, "answer_start": starts}


def _read_question(qa: Any, context: str, title: str, path: Path, where: str) -> dict:
    qid = _field(qa, "id", str, path, where)
    where = f"{where}, question id {qid!r}"
    question = _field(qa, "question", str, path, where)
    answers = _read_answers(qa, context, path, where)
    if "is_impossible" in qa:
        impossible = _field(qa, "is_impossible", bool, path, where)
        if impossible == bool(answers["text"]):
            state = "has answers" if impossible else "has no answers"
            raise _fail(path, where, f"is_impossible={impossible} but the question {state}")
    else:  # SQuAD v1.1 has no such key: every question is answerable
        impossible = not answers["text"]
    return {
        "id": qid,
        "title": title,
        "context": context,
        "question": question,
        "answers": answers,
        "is_impossible": impossible,
    }


def read_squad_json(path: str | Path) -> list[dict]:
    """Rows ``{id, title, context, question, answers: {text, answer_start}, is_impossible}`` of a SQuAD json.

    Reads the official v1.1 and v2.0 format (``data -> paragraphs -> qas``); v1.1 questions, which have no
    ``is_impossible`` key, are answerable. ``plausible_answers`` of v2.0 unanswerable questions are not
    gold answers and are dropped. Every ``answer_start`` must point to its answer text in the context
    (true for every answer of the shared SQuAD 2.0 dev file): a mismatch would silently train on the wrong
    span, so it is an error, as are a file that is not json, a missing or mistyped key, an empty answer
    text, ``is_impossible`` contradicting the answers, and a repeated question id. Each DataError names the
    file, the article/paragraph/question id and the problem.
    """
    path = Path(path)
    doc = _load_json(path)
    rows: list[dict] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(_field(doc, "data", list, path, "top level")):
        title = article.get("title", "") if isinstance(article, dict) else ""
        at_article = f"article {a} ({title!r})" if title else f"article {a}"
        for p, paragraph in enumerate(_field(article, "paragraphs", list, path, at_article)):
            where = f"{at_article}, paragraph {p}"
            context = _field(paragraph, "context", str, path, where)
            for qa in _field(paragraph, "qas", list, path, where):
                row = _read_question(qa, context, str(title), path, where)
                if row["id"] in seen:
                    raise _fail(path, where, f"question id {row['id']!r} repeats one of {seen[row['id']]}")
                seen[row["id"]] = where
                rows.append(row)
    return rows


# ---------------------------------------------------------------- windows (features)


def _check_windows_fit(
    rows: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int, stride: int
) -> list[str]:
    """The questions as tokenised (leading spaces stripped), after checking every window has context room.

    The fast tokenizer aborts the process (a Rust panic) or raises an opaque error when the question leaves
    no more than ``stride`` context tokens in a window; this turns that into an error naming the question.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{type(tokenizer).__name__} is not accepted: QA windows need a fast tokenizer (offsets)"
        )
    if stride < 0 or max_length <= 0:
        raise ConfigError(
            f"max_length={max_length}, stride={stride} is not accepted: need max_length > 0, stride >= 0"
        )
    if tokenizer.padding_side != "right":
        log.warning(
            "tokenizer.padding_side=%r: positions and offsets here index unpadded windows; pad them on the "
            "right (a left-padding collator would shift every label and logit)",
            tokenizer.padding_side,
        )
    # Some SQuAD questions start with many spaces; they would only eat window room.
    questions = [row["question"].lstrip() for row in rows]
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(rows)), key=lengths.__getitem__)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - lengths[longest]
    if room <= stride:
        raise ConfigError(
            f"max_length={max_length}, stride={stride} is not accepted: question id {rows[longest]['id']!r} has "
            f"{lengths[longest]} tokens, leaving {room} context tokens per window, which must exceed the stride; "
            "raise max_length or lower stride"
        )
    return questions


def _tokenize_windows(
    rows: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int, stride: int
) -> Any:
    questions = _check_windows_fit(rows, tokenizer, max_length, stride)
    return tokenizer(
        questions,
        [row["context"] for row in rows],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def _model_inputs(encoded: Any) -> dict[str, list]:
    keys = ("input_ids", "token_type_ids", "attention_mask")
    return {key: list(encoded[key]) for key in keys if key in encoded}


def _context_offsets(encoded: Any, i: int) -> Offsets:
    """Window ``i``'s character offsets, with None for every token that is not context."""
    return [
        tuple(offset) if seq == CONTEXT_SEQUENCE else None
        for offset, seq in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))
    ]


def _trimmed_answer(row: Mapping) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of the first gold answer without surrounding whitespace; None if none."""
    answers = row["answers"]
    if not answers["text"]:
        return None
    start = answers["answer_start"][0]
    end = start + len(answers["text"][0])
    context = row["context"]
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _answer_positions(offsets: Offsets, span: tuple[int, int] | None) -> tuple[int, int]:
    """Token positions of ``span`` in the window, or ``(CLS_INDEX, CLS_INDEX)`` unless it lies wholly inside."""
    context_tokens = [i for i, offset in enumerate(offsets) if offset is not None]
    if span is None or not context_tokens:
        return CLS_INDEX, CLS_INDEX
    first, last = context_tokens[0], context_tokens[-1]
    start_char, end_char = span
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return CLS_INDEX, CLS_INDEX
    # The answer's tokens are those overlapping [start_char, end_char).
    start = next(i for i in context_tokens if offsets[i][1] > start_char)
    end = next(i for i in reversed(context_tokens) if offsets[i][0] < end_char)
    # start > end only when no token covers the answer (characters the tokenizer drops): no usable label
    return (start, end) if start <= end else (CLS_INDEX, CLS_INDEX)


def _empty_features(keys: Sequence[str]) -> dict[str, list]:
    return {key: [] for key in ("input_ids", "attention_mask", *keys)}


def prepare_train_features(
    rows: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int = 384, stride: int = 128
) -> dict[str, list]:
    """Training windows: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``start/end_positions``.

    One row may give several windows. The label is the first gold answer's token span when the window
    holds all of it, else position 0 (``[CLS]``), also for unanswerable questions. Lists are unpadded;
    a right-padding collator keeps every position valid.
    """
    if not rows:
        return _empty_features(("start_positions", "end_positions"))
    encoded = _tokenize_windows(rows, tokenizer, max_length, stride)
    features = _model_inputs(encoded)
    features["start_positions"], features["end_positions"] = [], []
    spans = [_trimmed_answer(row) for row in rows]
    for i, row_index in enumerate(encoded["overflow_to_sample_mapping"]):
        start, end = _answer_positions(_context_offsets(encoded, i), spans[row_index])
        features["start_positions"].append(start)
        features["end_positions"].append(end)
    return features


def prepare_eval_features(
    rows: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int = 384, stride: int = 128
) -> dict[str, list]:
    """Evaluation windows: the model inputs plus ``example_id`` (the row's id) and ``offset_mapping``.

    ``offset_mapping[i][t]`` is the ``(start, end)`` character span of token ``t`` in the row's context, or
    None when the token is not context (question, special tokens), so decoding can never pick it.
    """
    if not rows:
        return _empty_features(("example_id", "offset_mapping"))
    encoded = _tokenize_windows(rows, tokenizer, max_length, stride)
    features = _model_inputs(encoded)
    mapping = encoded["overflow_to_sample_mapping"]
    features["example_id"] = [rows[row_index]["id"] for row_index in mapping]
    features["offset_mapping"] = [_context_offsets(encoded, i) for i in range(len(mapping))]
    return features


# ---------------------------------------------------------------- decoding predictions


def _as_vector(logits: Any, length: int, what: str) -> np.ndarray:
    """One window's logits as float64, cut to the window's length (right padding beyond it is ignored)."""
    if hasattr(logits, "detach"):  # a torch tensor, possibly bf16 or on an accelerator
        logits = logits.detach().float().cpu().numpy()
    vector = np.asarray(logits, dtype=np.float64).reshape(-1)
    if vector.shape[0] < length:
        raise ValueError(f"{what} has {vector.shape[0]} positions, fewer than the window's {length} tokens")
    return vector[:length]


def _window_spans(
    context: str, offsets: Offsets, start: np.ndarray, end: np.ndarray, n_best: int, max_answer_length: int
) -> list[dict]:
    """Valid spans of one window built from its ``n_best`` best start and end context tokens."""
    context_tokens = np.array([i for i, offset in enumerate(offsets) if offset is not None], dtype=np.int64)
    if context_tokens.size == 0:
        return []
    top_starts = context_tokens[np.argsort(-start[context_tokens], kind="stable")[:n_best]]
    top_ends = context_tokens[np.argsort(-end[context_tokens], kind="stable")[:n_best]]
    spans = []
    for s in top_starts:
        for e in top_ends:
            if e < s or e - s + 1 > max_answer_length:
                continue
            begin, finish = offsets[s][0], offsets[e][1]
            spans.append(
                {
                    "text": context[begin:finish],
                    "score": float(start[s] + end[e]),
                    "start_logit": float(start[s]),
                    "end_logit": float(end[e]),
                    "offsets": (begin, finish),
                }
            )
    return spans


def _best_distinct(spans: list[dict], n_best: int) -> list[dict]:
    """The ``n_best`` highest-scoring spans, one per character span (overlapping windows repeat spans)."""
    kept: dict[tuple[int, int], dict] = {}
    for span in sorted(spans, key=lambda s: -s["score"]):
        kept.setdefault(span["offsets"], span)
        if len(kept) == n_best:
            break
    return list(kept.values())


def _add_probabilities(entries: list[dict]) -> list[dict]:
    if entries:
        top = max(e["score"] for e in entries)
        weights = [math.exp(e["score"] - top) for e in entries]
        total = sum(weights)
        for entry, weight in zip(entries, weights):
            entry["probability"] = weight / total
    return entries


def _decide(
    spans: list[dict], null: dict | None, n_best: int, version_2: bool, threshold: float
) -> tuple[str, list[dict]]:
    """The answer and n-best list of one question from its windows' spans and its null candidate."""
    best = _best_distinct(spans, n_best)
    if not version_2:
        return (best[0]["text"] if best else ""), _add_probabilities(best)
    entries = sorted(best + [null], key=lambda s: -s["score"])[:n_best]
    if best and null["score"] - best[0]["score"] <= threshold:
        return best[0]["text"], _add_probabilities(entries)
    return "", _add_probabilities(entries)


def _group_features(example_ids: Sequence[str], n_start: int, n_end: int) -> dict[str, list[int]]:
    if not len(example_ids) == n_start == n_end:
        raise ValueError(
            f"{len(example_ids)} features but {n_start} start and {n_end} end logit rows: they must match"
        )
    groups: dict[str, list[int]] = defaultdict(list)
    for i, example_id in enumerate(example_ids):
        groups[example_id].append(i)
    return groups


def postprocess_predictions(
    rows: Sequence[Mapping],
    features: Mapping[str, Sequence],
    start_logits: Sequence,
    end_logits: Sequence,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Answers ``{id: text}`` (the official predictions json) and n-best lists from per-window logits.

    ``features`` is :func:`prepare_eval_features`' output (``example_id`` and ``offset_mapping`` are used);
    ``start_logits[i]``/``end_logits[i]`` belong to window ``i``, as arrays, lists or tensors, and may be
    longer than the window (right padding of a batch): positions past the window are ignored. For each
    question, the ``n_best`` best start and end context tokens of every window form candidate spans (end
    not before start, at most ``max_answer_length`` tokens), mapped to context text through the offsets;
    a span found in two overlapping windows is listed once, with its best score. Version 2: the null score
    is the smallest ``start[0] + end[0]`` over the question's windows, and the answer is ``""`` when
    ``null_score - best_span_score > null_score_diff_threshold`` (or there is no valid span); the n-best
    list then holds the null candidate (``text`` ``""``) too. Each n-best entry has ``text``, ``score``,
    ``start_logit``, ``end_logit``, ``offsets`` (character span; None for the null one) and ``probability``
    (softmax over the listed scores).
    """
    groups = _group_features(features["example_id"], len(start_logits), len(end_logits))
    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict]] = {}
    for row in rows:
        windows = groups.get(row["id"])
        if not windows:
            raise ValueError(
                f"question id {row['id']!r} has no feature: rows and features must come together"
            )
        spans: list[dict] = []
        null: dict | None = None
        for i in windows:
            offsets = features["offset_mapping"][i]
            start = _as_vector(start_logits[i], len(offsets), f"start_logits[{i}]")
            end = _as_vector(end_logits[i], len(offsets), f"end_logits[{i}]")
            spans += _window_spans(row["context"], offsets, start, end, n_best, max_answer_length)
            null_score = float(start[CLS_INDEX] + end[CLS_INDEX])
            if null is None or null_score < null["score"]:
                null = {
                    "text": "",
                    "score": null_score,
                    "start_logit": float(start[CLS_INDEX]),
                    "end_logit": float(end[CLS_INDEX]),
                    "offsets": None,
                }
        predictions[row["id"]], nbest[row["id"]] = _decide(
            spans, null, n_best, version_2, null_score_diff_threshold
        )
    return predictions, nbest
