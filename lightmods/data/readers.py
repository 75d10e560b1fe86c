"""Loading a task's split as rows with the hub's column names, from local files in each benchmark's
original format or from the hub. Every malformed row stops the run with the file, line and problem:
nothing is silently dropped or mislabelled."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from lightmods.data.tasks import TaskSpec
from lightmods.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def parse_label(value, task: TaskSpec, where: str):
    """A label from a file (name, number or bool) as a class index, or a float for regression."""
    if task.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {value!r} is not a number (regression task {task.name})") from None
    names = task.label_names
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        i = int(value)
        if str(i) == str(value).strip() and 0 <= i < len(names):
            return i
    except (TypeError, ValueError):
        pass
    raise DataError(f"{where}: label {value!r} is not accepted; accepted: {', '.join(names)} or 0..{len(names) - 1}")


def _is_test(split: str) -> bool:
    return split.startswith("test")


# ---------------------------------------------------------------- GLUE tsv


def read_glue_tsv(path: Path, task: TaskSpec, split: str) -> list[dict]:
    """GLUE's tsv: quoting off (MRPC, RTE and QNLI contain literal quotes), a UTF-8 BOM allowed (MRPC),
    header-less CoLA train/dev (columns by position), unlabelled test files."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines:
        raise DataError(f"{path}: empty file")
    positional = any(isinstance(v, int) for v in task.local_columns.values())
    if positional and lines[0] and lines[0][0] == "index":  # CoLA's test.tsv has a header: index, sentence
        positional = False
        columns = {c: c for c in task.text_fields}
    else:
        columns = dict(task.local_columns)
    header, body, first_line = (None, lines, 1) if positional else (lines[0], lines[1:], 2)
    index_of: dict[str, int] = {}
    for col, src in columns.items():
        if isinstance(src, int):
            index_of[col] = src
        elif src in header:
            index_of[col] = header.index(src)
        elif col == "label" and _is_test(split):
            continue  # test files have no labels
        else:
            raise DataError(f"{path}: missing column {src!r} (needed as {col!r}); the header has {header}")
    id_col = header.index("index") if header and "index" in header else (header.index("id") if header and "id" in header else None)
    width = len(header) if header else max(index_of.values()) + 1
    rows = []
    for n, fields in enumerate(body):
        lineno = n + first_line
        if not fields or fields == [""]:
            continue
        if (header and len(fields) != width) or (not header and len(fields) < width):
            raise DataError(f"{path}:{lineno}: {len(fields)} tab-separated fields, expected {width}")
        row = {col: fields[i] for col, i in index_of.items() if col != "label"}
        row["label"] = parse_label(fields[index_of["label"]], task, f"{path}:{lineno}") if "label" in index_of else None
        row["idx"] = int(fields[id_col]) if id_col is not None and fields[id_col].isdigit() else len(rows)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- StyleAttack tsv (backdoor sets)


def read_backdoor_tsv(path: Path, task: TaskSpec, split: str = "") -> list[dict]:
    """The backdoor sets' tsv (thunlp/StyleAttack): ``text \\t label`` per line, quoting off; a header line
    (``sentence\\tlabel``, or ``sentences \\t labels`` with spaces in the poisoned files) or none (OffensEval);
    CRLF or LF endings; the text and label are stripped of the padding the poisoned files carry. Rows go
    under the task's first text field."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines:
        raise DataError(f"{path}: empty file")
    first = lines[0][-1].strip() if lines[0] else ""
    header = first.lower() in ("label", "labels")
    rows = []
    for n, fields in enumerate(lines[1:] if header else lines):
        lineno = n + (2 if header else 1)
        if not fields or fields == [""] or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != 2:
            raise DataError(f"{path}:{lineno}: {len(fields)} tab-separated fields, expected 2 (text, label)")
        label = fields[1].strip()
        rows.append({
            task.text_fields[0]: fields[0].strip(),
            "label": None if _is_test(split) and not label else parse_label(label, task, f"{path}:{lineno}"),
            "idx": len(rows),
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------- SuperGLUE jsonl


def _normalise_superglue(raw: dict, task: TaskSpec, where: str, split: str) -> list[dict]:
    """One jsonl record as hub-style rows (MultiRC passages become one row per answer)."""
    name = task.name.split("/")[-1]
    if name == "multirc":
        passage = raw.get("passage")
        if not isinstance(passage, dict) or "text" not in passage or "questions" not in passage:
            raise DataError(f"{where}: MultiRC record needs passage.text and passage.questions")
        rows = []
        for q in passage["questions"]:
            for a in q.get("answers", []):
                label = a.get("label")
                rows.append({
                    "paragraph": passage["text"], "question": q["question"], "answer": a["text"],
                    "idx": {"paragraph": raw.get("idx"), "question": q.get("idx"), "answer": a.get("idx")},
                    "label": None if label is None else parse_label(label, task, where),
                })  # fmt: skip
        return rows
    if name == "record":
        return _record_rows(raw, task, where)
    row = {task.column_renames.get(k, k): v for k, v in raw.items()}
    if name == "wsc" and isinstance(row.get("target"), dict):
        row.update(row.pop("target"))
    if "label" in row and row["label"] is not None:
        row["label"] = parse_label(row["label"], task, where)
    elif _is_test(split) or "label" not in row:
        row["label"] = None
    return [row]


def _record_rows(raw: dict, task: TaskSpec, where: str) -> list[dict]:
    """A ReCoRD passage with its queries as one row per query: candidate entities (the passage's marked
    spans; ``end`` is inclusive) and gold answer texts. ``@highlight`` markers become "- " as usual."""
    passage = raw.get("passage")
    if not isinstance(passage, dict) or "text" not in passage or "entities" not in passage or "qas" not in raw:
        raise DataError(f"{where}: ReCoRD record needs passage.text, passage.entities and qas")
    text = passage["text"]
    try:
        entities = list(dict.fromkeys(text[e["start"] : e["end"] + 1] for e in passage["entities"]))
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: a ReCoRD entity needs integer start and end ({e})") from None
    rows = []
    for q in raw["qas"]:
        if "@placeholder" not in q.get("query", ""):
            raise DataError(f"{where}: ReCoRD query {q.get('idx')!r} has no @placeholder")
        rows.append({
            "passage": text.replace("@highlight\n", "- "), "query": q["query"], "entities": entities,
            "answers": list(dict.fromkeys(a["text"] for a in q.get("answers", []))),
            "idx": {"passage": raw.get("idx"), "query": q.get("idx")}, "label": None,
        })  # fmt: skip
    return rows


def json_objects(path: Path):
    """``(line number, object)`` for each non-blank line of a jsonl file; a line that is not a JSON object
    stops with the file, line and problem."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(raw, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(raw).__name__}")
            yield lineno, raw


def read_jsonl(path: Path, task: TaskSpec, split: str) -> list[dict]:
    rows: list[dict] = []
    for lineno, raw in json_objects(path):
        for row in _normalise_superglue(raw, task, f"{path}:{lineno}", split):
            missing = [f for f in task.text_fields if f not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}; {task.name} rows need {list(task.text_fields)}")
            rows.append(row)
    return rows


# ---------------------------------------------------------------- sources


def local_file(task: TaskSpec, data_dir: str, split: str) -> Path | None:
    for name in task.local_files.get(split, ()):
        path = Path(data_dir) / name
        if path.exists():
            return path
    return None


def read_local_split(task: TaskSpec, data_dir: str, split: str) -> list[dict] | None:
    """Rows of ``split`` from ``data_dir``; None when the file is absent (allowed for test splits only)."""
    path = local_file(task, data_dir, split)
    if path is None:
        if _is_test(split):
            return None
        expected = " or ".join(task.local_files.get(split, ()))
        raise ConfigError(f"data.data_dir={data_dir!r} has no {expected} for the {split} split of {task.name}")
    from lightmods.data.qa import read_squad_json

    readers = {
        "glue_tsv": read_glue_tsv, "backdoor_tsv": read_backdoor_tsv, "jsonl": read_jsonl,
        "squad_json": lambda p, t, s: read_squad_json(p),
    }  # fmt: skip
    reader = readers[task.local_format]
    rows = reader(path, task, split)
    if task.holdout and split in ("train", *task.eval_splits):
        other = local_file(task, data_dir, next(iter(task.eval_splits)) if split == "train" else "train")
        if other is not None and other.resolve() == path.resolve():  # one labelled file: carve out validation
            rows = holdout_rows(rows, task.holdout, evaluation=split != "train")
    log.info("%s: %d rows from %s", task.name, len(rows), path)
    return rows


def holdout_rows(rows: list[dict], share: float, evaluation: bool) -> list[dict]:
    """The evaluation part (``round(share * n)`` rows of every label, chosen by a fixed seed) or the training
    part (the rest) of one labelled file, each in file order. Independent of the run's seed, so every run
    evaluates on the same rows."""
    import random

    by_label: dict = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["label"], []).append(i)
    held: set[int] = set()
    for label in sorted(by_label, key=str):
        positions = list(by_label[label])
        random.Random(f"holdout-{label}").shuffle(positions)
        held.update(positions[: round(share * len(positions))])
    return [row for i, row in enumerate(rows) if (i in held) == evaluation]


def read_hub_split(task: TaskSpec, split: str, revision: str | None = None) -> list[dict] | None:
    """Rows of ``split`` from the hub (parquet). SuperGLUE falls back to the hub's parquet conversion
    branch when the main branch still holds a loading script, which datasets no longer runs."""
    from datasets import load_dataset

    hub_split = task.hub_splits.get(split)
    if hub_split is None:
        return None
    try:
        try:
            ds = load_dataset(task.hub_path, task.hub_config, split=hub_split, revision=revision)
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e):
                raise
            ds = load_dataset(task.hub_path, task.hub_config, split=hub_split, revision="refs/convert/parquet")
    except Exception as e:  # noqa: BLE001 - offline, missing or renamed datasets all end here
        raise ConfigError(
            f"data.source='hub': {task.hub_path}/{task.hub_config} ({hub_split}) could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); accepted: a reachable hub or "
            f"the local cache, or data.source=local with data.data_dir=<folder with the original files>"
        ) from e
    rows = []
    for r in ds:
        r = {task.column_renames.get(k, k): v for k, v in dict(r).items()}
        if task.head == "qa":
            r["is_impossible"] = len(r["answers"]["text"]) == 0
            rows.append(r)
            continue
        if task.builder == "record":
            r["passage"] = r["passage"].replace("@highlight\n", "- ")
            r["entities"], r["answers"], r["label"] = list(dict.fromkeys(r["entities"])), list(r["answers"]), None
            rows.append(r)
            continue
        if r.get("label") is not None and not task.is_regression and r["label"] < 0:
            r["label"] = None  # unlabelled test rows
        rows.append(r)
    return rows
