"""Turning rows into model inputs, one builder per input shape.

``text``: one sentence or a sentence pair. ``wic``: the target word leads the first sentence.
``wsc``: the candidate noun phrase is marked ``* ... *`` and the pronoun ``# ... #`` in the text.
``copa``: one (premise + question, choice) pair per choice, scored jointly (multiple choice).
``multirc``: one (paragraph, question + answer) pair per answer, grouped by question for EM.
``record``: one (passage, query with the candidate entity in place of @placeholder) pair per candidate,
labelled 1 when the entity is a gold answer, grouped by query; the best-scored candidate is the answer.
Every feature row carries ``idx`` (the row's position in its split) so predictions map back to rows.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lightmods.data.tasks import TaskSpec
from lightmods.errors import DataError

COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}


def _wsc_text(row: dict, where: str) -> str:
    words = row["text"].split(" ")
    marks = []
    for key, (left, right) in (("span1", ("*", "*")), ("span2", ("#", "#"))):
        start = int(row[f"{key}_index"])
        length = len(str(row[f"{key}_text"]).split(" "))
        if not 0 <= start < len(words):
            raise DataError(f"{where}: {key}_index={start} is outside the text ({len(words)} words)")
        marks.append((start, start + length - 1, left, right))
    for start, end, left, right in sorted(marks, reverse=True):
        end = min(end, len(words) - 1)
        words[end] = words[end] + " " + right
        words[start] = left + " " + words[start]
    return " ".join(words)


def text_inputs(task: TaskSpec, rows: list[dict], split: str) -> tuple[list[str], list[str] | None]:
    """The first and (optional) second text of each row, for builders that make one feature per row."""
    name = task.builder
    if name == "text":
        first = [r[task.text_fields[0]] for r in rows]
        return first, ([r[task.text_fields[1]] for r in rows] if len(task.text_fields) > 1 else None)
    if name == "wic":
        return [f"{r['word']} : {r['sentence1']}" for r in rows], [r["sentence2"] for r in rows]
    if name == "wsc":
        return [_wsc_text(r, f"{task.name}/{split} row {i}") for i, r in enumerate(rows)], None
    if name == "multirc":
        return [r["paragraph"] for r in rows], [f"{r['question']} {r['answer']}" for r in rows]
    raise KeyError(name)


def encode(task: TaskSpec, rows: list[dict], split: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list]:
    """Tokenised features (lists of ids) with ``labels``, ``idx`` and, where a task needs it, ``group``."""
    if task.builder == "copa":
        return _encode_choices(task, rows, tokenizer, max_length)
    if task.builder == "record":
        return _encode_candidates(rows, tokenizer, max_length)
    first, second = text_inputs(task, rows, split)
    truncation = "only_first" if task.builder == "multirc" else True  # keep MultiRC's question and answer whole
    enc = tokenizer(first, second, truncation=truncation, max_length=max_length)
    features = {k: list(v) for k, v in enc.items()}
    features["labels"] = [_label(task, r) for r in rows]
    features["idx"] = list(range(len(rows)))
    if rows and "pair_id" in rows[0]:  # AX-g: sentence pairs that differ only in the pronoun's gender
        features["group"] = [int(r["pair_id"]) for r in rows]
    if task.builder == "multirc":
        groups: dict = {}
        features["group"] = [groups.setdefault((str(r["idx"]["paragraph"]), str(r["idx"]["question"])), len(groups)) for r in rows]
    return features


def _label(task: TaskSpec, row: dict):
    if row["label"] is None:
        return -100.0 if task.is_regression else -100  # unlabelled (test): ignored by losses and metrics
    return float(row["label"]) if task.is_regression else int(row["label"])


def _encode_choices(task: TaskSpec, rows: list[dict], tokenizer, max_length: int) -> dict[str, list]:
    """Multiple choice: each feature holds one encoding per choice."""
    features: dict[str, list] = {}
    for r in rows:
        question = COPA_QUESTIONS.get(r["question"], r["question"])
        enc = tokenizer([f"{r['premise']} {question}"] * 2, [r["choice1"], r["choice2"]], truncation=True, max_length=max_length)
        for k, v in enc.items():
            features.setdefault(k, []).append(list(v))
    features["labels"] = [_label(task, r) for r in rows]
    features["idx"] = list(range(len(rows)))
    return features


def _encode_candidates(rows: list[dict], tokenizer, max_length: int) -> dict[str, list]:
    """ReCoRD: a binary feature per (query, candidate entity); ``group`` is the query's row position."""
    first, second, labels, groups, candidates = [], [], [], [], []
    for i, r in enumerate(rows):
        for entity in r["entities"]:
            first.append(r["passage"])
            second.append(r["query"].replace("@placeholder", entity))
            labels.append(int(entity in r["answers"]) if r["answers"] else -100)
            groups.append(i)
            candidates.append(entity)
    enc = tokenizer(first, second, truncation="only_first", max_length=max_length)
    features = {k: list(v) for k, v in enc.items()}
    features.update(labels=labels, group=groups, idx=list(range(len(labels))), candidate=candidates)
    return features
