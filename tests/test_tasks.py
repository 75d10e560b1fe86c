"""GLUE and SuperGLUE: every task trains and evaluates on the tiny model from local files in the
original formats (the real files in ../shared/data, small fixtures otherwise); official metric values
pinned; reader quirks and malformed files; the tokenisation cache; submission files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightmods.config import validate
from lightmods.data import TASKS, TextClassificationDataModule, get_task
from lightmods.data.metrics import TaskMetrics, headline_keys, with_score
from lightmods.data.readers import read_glue_tsv, read_local_split
from lightmods.errors import ConfigError, DataError
from lightmods.models import build_tokenizer
from lightmods.run import train
from tests.conftest import ROOT, SHARED, compose_run

FIXTURES = ROOT / "tests" / "fixtures"
DATA_DIRS = {
    "glue/cola": SHARED / "data/glue/CoLA", "glue/sst2": SHARED / "data/glue/SST-2", "glue/mrpc": SHARED / "data/glue/MRPC",
    "glue/stsb": SHARED / "data/glue/STS-B", "glue/qnli": SHARED / "data/glue/QNLI", "glue/rte": SHARED / "data/glue/RTE",
    "glue/qqp": FIXTURES / "glue/QQP", "glue/mnli": FIXTURES / "glue/MNLI", "glue/wnli": FIXTURES / "glue/WNLI",
    "superglue/boolq": SHARED / "data/superglue/BoolQ", "superglue/cb": SHARED / "data/superglue/CB",
    "superglue/copa": SHARED / "data/superglue/COPA", "superglue/multirc": SHARED / "data/superglue/MultiRC",
    "superglue/rte": SHARED / "data/superglue/RTE", "superglue/wic": SHARED / "data/superglue/WiC",
    "superglue/wsc": SHARED / "data/superglue/WSC", "superglue/record": FIXTURES / "superglue/ReCoRD",
    "qa/squad": FIXTURES / "squad", "qa/squad_v2": None,  # the shared dev set + a fixture train file, see below
    "glue/ax": None, "superglue/axb": None, "superglue/axg": None,  # base task files + a diagnostic fixture
    "backdoor/sst2": SHARED / "data/backdoor/clean/sst-2", "backdoor/olid": SHARED / "data/backdoor/clean/offenseval",
    "backdoor/hatespeech": SHARED / "data/backdoor/clean/hate-speech", "backdoor/ag": SHARED / "data/backdoor/clean/ag",
}  # fmt: skip
DIAGNOSTICS = {
    "glue/ax": (FIXTURES / "glue/MNLI", FIXTURES / "glue/AX/AX.tsv"),
    "superglue/axb": (SHARED / "data/superglue/RTE", FIXTURES / "superglue/AX-b/AX-b.jsonl"),
    "superglue/axg": (SHARED / "data/superglue/RTE", FIXTURES / "superglue/AX-g/AX-g.jsonl"),
}


def data_dir(task: str, tmp_path: Path) -> Path:
    if task in DIAGNOSTICS:
        base, fixture = DIAGNOSTICS[task]
        d = tmp_path / task.replace("/", "_")
        if not d.exists():
            d.mkdir()
            for f in [*base.iterdir(), fixture]:
                (d / f.name).symlink_to(f)
        return d
    if task != "qa/squad_v2":
        return DATA_DIRS[task]
    d = tmp_path / "squad_v2"
    d.mkdir(exist_ok=True)
    for src in (SHARED / "data/squad/dev-v2.0.json", FIXTURES / "squad/train-v2.0.json"):
        if not (d / src.name).exists():
            (d / src.name).symlink_to(src)
    return d


def test_every_registered_benchmark_task_has_a_config_and_local_data():
    # demo, images/synthetic: generated; images/folder (any folder of images): tests/test_evit.py;
    # lm/* (any text corpus): tests/test_lm.py
    tasks = {t for t, spec in TASKS.items() if "generated" not in spec.sources and spec.builder not in ("image_folder", "lm")}
    assert tasks == set(DATA_DIRS)
    configs = {p.relative_to(ROOT / "conf" / "data").with_suffix("").as_posix() for p in (ROOT / "conf" / "data").rglob("*.yaml")}
    assert tasks <= configs


@pytest.mark.parametrize("task", sorted(DATA_DIRS))
def test_every_task_trains_and_evaluates_from_local_files(task, run_cfg, tmp_path):
    cfg = run_cfg(f"data={task}", f"data.data_dir={data_dir(task, tmp_path)}", f"data.cache_dir={tmp_path / 'cache'}")
    metrics = train(cfg)
    spec = get_task(task)
    headline = headline_keys(spec)
    assert set(headline) | {"val/score"} <= set(metrics)
    if task == "qa/squad_v2":
        assert {"val/HasAns_exact", "val/NoAns_f1"} <= set(metrics)
    elif not spec.base:  # backdoor sets also report their clean accuracy (lightmods.attacks)
        assert set(metrics) == set(headline) | {"val/score"} | ({"val/cacc"} if spec.benchmark == "backdoor" else set())
    assert metrics["val/score"] == pytest.approx(sum(metrics[k] for k in headline) / len(headline), abs=1e-5)
    out = Path(cfg.paths.output_dir)
    for split in spec.eval_splits:
        assert (out / "predictions" / f"{split}.{'json' if spec.head == 'qa' else 'jsonl'}").exists()


def test_mnli_reports_matched_and_mismatched(run_cfg, tmp_path):
    cfg = run_cfg("data=glue/mnli", f"data.data_dir={DATA_DIRS['glue/mnli']}", f"data.cache_dir={tmp_path}")
    m = train(cfg)
    assert m["val/score"] == pytest.approx((m["val/accuracy"] + m["val/accuracy_mm"]) / 2, abs=1e-6)
    sub = Path(cfg.paths.output_dir) / "predictions"
    assert (sub / "MNLI-m.tsv").read_text().splitlines()[0] == "index\tprediction"
    assert {line.split("\t")[1] for line in (sub / "MNLI-mm.tsv").read_text().splitlines()[1:]} <= {"entailment", "neutral", "contradiction"}


# ---------------------------------------------------------------- official metric values


def _score(task_name: str, rows: list[dict], pred: int) -> dict:
    task = get_task(task_name)
    m = TaskMetrics(task)
    labels = torch.tensor([r["label"] for r in rows])
    logits = torch.nn.functional.one_hot(torch.full_like(labels, pred), task.num_labels).float()
    groups = torch.arange(len(rows))
    m.update(logits, labels, groups)
    return with_score(m.compute(), get_task(task_name))


def test_mrpc_all_ones_pins_accuracy_and_f1():
    rows = read_local_split(get_task("glue/mrpc"), str(DATA_DIRS["glue/mrpc"]), "validation")
    s = _score("glue/mrpc", rows, 1)
    assert len(rows) == 408
    assert s["val/accuracy"] == pytest.approx(0.683824, abs=1e-6) and s["val/f1"] == pytest.approx(0.812227, abs=1e-6)


def test_cb_all_contradiction_pins_macro_f1():
    task = get_task("superglue/cb")
    rows = read_local_split(task, str(DATA_DIRS["superglue/cb"]), "validation")
    s = _score("superglue/cb", rows, task.label_names.index("contradiction"))
    assert len(rows) == 56 and s["val/macro_f1"] == pytest.approx(0.222222, abs=1e-6)


def test_multirc_em_is_per_question_and_f1a_over_answers():
    task = get_task("superglue/multirc")
    m = TaskMetrics(task)
    labels = torch.tensor([1, 0, 1, 1, 0])
    preds = torch.tensor([1, 0, 1, 0, 0])  # question 0 all right, question 1 one wrong, question 2 right
    groups = torch.tensor([0, 0, 1, 1, 2])
    m.update(torch.nn.functional.one_hot(preds, 2).float(), labels, groups)
    v = m.compute()
    assert v["val/em"] == pytest.approx(2 / 3) and v["val/f1a"] == pytest.approx(0.8)


def test_cola_is_scored_with_matthews_and_stsb_with_correlations():
    assert get_task("glue/cola").metrics == ("mcc",) and get_task("glue/stsb").metrics == ("pearson", "spearman")
    rows = read_local_split(get_task("glue/stsb"), str(DATA_DIRS["glue/stsb"]), "validation")
    m = TaskMetrics(get_task("glue/stsb"))
    gold = torch.tensor([r["label"] for r in rows])
    m.update(gold.unsqueeze(-1) * 2 + 1, gold)  # a linear map of the gold scores correlates perfectly
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in m.compute().values())


# ---------------------------------------------------------------- readers


def test_glue_tsv_quirks():
    mrpc = read_local_split(get_task("glue/mrpc"), str(DATA_DIRS["glue/mrpc"]), "validation")
    assert mrpc[0]["sentence2"].startswith('" The foodservice')  # literal quote kept (quoting off), BOM stripped
    cola = read_local_split(get_task("glue/cola"), str(DATA_DIRS["glue/cola"]), "validation")
    assert len(cola) == 1043 and cola[0] == {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1, "idx": 0}
    qnli = read_local_split(get_task("glue/qnli"), str(DATA_DIRS["glue/qnli"]), "validation")
    assert len(qnli) == 5463 and {r["label"] for r in qnli} == {0, 1}
    sst2 = read_local_split(get_task("glue/sst2"), str(DATA_DIRS["glue/sst2"]), "train")
    assert len(sst2) == 6920


def test_superglue_nested_formats_are_flattened():
    multirc = read_local_split(get_task("superglue/multirc"), str(DATA_DIRS["superglue/multirc"]), "validation")
    assert set(multirc[0]["idx"]) == {"paragraph", "question", "answer"} and len(multirc) > 83
    wsc = read_local_split(get_task("superglue/wsc"), str(DATA_DIRS["superglue/wsc"]), "validation")
    assert {"span1_index", "span2_text"} <= set(wsc[0]) and "target" not in wsc[0]
    cb = read_local_split(get_task("superglue/cb"), str(DATA_DIRS["superglue/cb"]), "validation")
    assert cb[0]["label"] == get_task("superglue/cb").label_names.index("contradiction")


@pytest.mark.parametrize(
    "content,task,message",
    [
        ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\tfields\n", "glue/rte", r"dev.tsv:3: 3 tab-separated fields, expected 4"),
        ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "glue/rte", r"dev.tsv:2: label 'maybe' is not accepted; accepted: entailment, not_entailment"),
        ("index\tsentence1\tsentence2\n0\ta\tb\n", "glue/rte", r"missing column 'label'"),
        ("index\tsentence1\tsentence2\tscore\n0\ta\tb\thigh\n", "glue/stsb", r"dev.tsv:2: label 'high' is not a number"),
    ],
)
def test_malformed_glue_files_name_file_line_and_problem(tmp_path, content, task, message):
    (tmp_path / "dev.tsv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_glue_tsv(tmp_path / "dev.tsv", get_task(task), "validation")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "neutral", "idx": 0}\n{oops\n')
    with pytest.raises(DataError, match=r"val.jsonl:2: not valid JSON"):
        read_local_split(get_task("superglue/cb"), str(tmp_path), "validation")
    (tmp_path / "val.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "unsure", "idx": 0}\n')
    with pytest.raises(DataError, match=r"val.jsonl:1: label 'unsure' is not accepted"):
        read_local_split(get_task("superglue/cb"), str(tmp_path), "validation")


def test_missing_column_in_jsonl_stops_the_run(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"premise": "a", "label": "neutral", "idx": 0}\n')
    (tmp_path / "val.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "neutral", "idx": 0}\n')
    rc = validate(compose_run(["model=tiny", "data=superglue/cb", f"data.data_dir={tmp_path}", "data.cache=false"], tmp_path / "o"))
    dm = TextClassificationDataModule(get_task("superglue/cb"), rc.data, build_tokenizer(rc.model))
    with pytest.raises(DataError, match=r"train.jsonl:1: missing field\(s\) \['hypothesis'\]"):
        dm.setup("fit")


def test_missing_files_and_dirs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.data_dir='/no/such/dir'"):
        validate(compose_run(["data=glue/rte", "data.data_dir=/no/such/dir"], tmp_path))
    with pytest.raises(ConfigError, match=r"has no dev.tsv for the validation split of glue/rte"):
        read_local_split(get_task("glue/rte"), str(tmp_path), "validation")


def test_data_dir_alone_switches_to_local_files(tmp_path):
    rc = validate(compose_run(["data=glue/rte", f"data.data_dir={DATA_DIRS['glue/rte']}"], tmp_path))
    assert rc.data.source == "local"
    assert validate(compose_run(["data=glue/rte"], tmp_path)).data.source == "hub"


def test_hub_source_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from lightmods.data.readers import read_hub_split

    with pytest.raises(ConfigError, match=r"data.source='hub': nyu-mll/glue/rte \(validation\) could not be loaded.*data.source=local"):
        read_hub_split(get_task("glue/rte"), "validation")


# ---------------------------------------------------------------- cache and submissions


def test_second_setup_reads_the_tokenisation_cache(tmp_path, monkeypatch):
    rc = validate(compose_run(["model=tiny", "data=glue/rte", f"data.data_dir={DATA_DIRS['glue/rte']}", f"data.cache_dir={tmp_path}"], tmp_path / "o"))
    tok = build_tokenizer(rc.model)
    first = TextClassificationDataModule(get_task("glue/rte"), rc.data, tok)
    first.setup("fit")
    assert len(list((tmp_path / "tokenized").glob("glue_rte-*.pt"))) == 2

    def no_encoding(*a, **k):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr("lightmods.data.datamodule.encode", no_encoding)
    second = TextClassificationDataModule(get_task("glue/rte"), rc.data, tok)
    second.setup("fit")
    assert second.datasets["validation"].features == first.datasets["validation"].features


def _with_test_file(tmp_path: Path, shared: Path, fixture: Path) -> Path:
    d = tmp_path / shared.name
    d.mkdir()
    for f in shared.iterdir():
        if f.name != fixture.name:
            (d / f.name).symlink_to(f)
    (d / fixture.name).symlink_to(fixture)
    return d


def test_glue_submission_file(run_cfg, tmp_path):
    d = _with_test_file(tmp_path, DATA_DIRS["glue/rte"], FIXTURES / "glue/RTE/test.tsv")
    cfg = run_cfg("data=glue/rte", f"data.data_dir={d}", f"data.cache_dir={tmp_path / 'c'}")
    train(cfg)
    lines = (Path(cfg.paths.output_dir) / "predictions" / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 7
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}


@pytest.mark.parametrize("task,folder,check", [
    ("superglue/boolq", "BoolQ", lambda recs: {r["label"] for r in recs} <= {"true", "false"} and len(recs) == 2),
    ("superglue/copa", "COPA", lambda recs: recs[0]["label"] in (0, 1) and recs[0]["idx"] == 0),
    ("superglue/multirc", "MultiRC", lambda recs: [len(q["answers"]) for q in recs[0]["passage"]["questions"]] == [2, 2]),
    ("superglue/record", "ReCoRD", lambda recs: [r["idx"] for r in recs] == [0, 1, 2] and recs[2]["label"] in
     {"NASA", "Artemis", "Florida", "Orion", "Moon"}),
])  # fmt: skip
def test_superglue_submission_files(run_cfg, tmp_path, task, folder, check):
    d = _with_test_file(tmp_path, DATA_DIRS[task], FIXTURES / f"superglue/{folder}/test.jsonl")
    cfg = run_cfg(f"data={task}", f"data.data_dir={d}", f"data.cache_dir={tmp_path / 'c'}")
    train(cfg)
    name = get_task(task).submission
    recs = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "predictions" / f"{name}.jsonl").read_text().splitlines()]
    assert check(recs)


def test_wsc_marks_both_spans():
    from lightmods.data.builders import _wsc_text

    row = {"text": "Mark told Pete many lies about himself .", "span1_index": 2, "span1_text": "Pete", "span2_index": 6, "span2_text": "himself"}
    assert _wsc_text(row, "x") == "Mark told * Pete * many lies about # himself # ."


def test_squad_v2_no_answer_everywhere_scores_the_unanswerable_share(tmp_path):
    """Windows, decoding and scoring together: logits that favour the no-answer position for every window
    of the shared SQuAD 2.0 dev set give EM = F1 = 52.1224, its unanswerable share."""
    from lightmods.data.qa_metrics import SquadMetrics

    rc = validate(compose_run(["model=minilm", "data=qa/squad_v2", f"data.data_dir={data_dir('qa/squad_v2', tmp_path)}", "data.cache=false"], tmp_path / "o"))
    dm = TextClassificationDataModule(get_task("qa/squad_v2"), rc.data, build_tokenizer(rc.model))
    dm.setup("validate")
    feats = dm.datasets["validation"].features
    n = len(feats["input_ids"])
    assert len(dm.raw["validation"]) == 6078 and n > 6078  # long contexts give several windows
    metric = SquadMetrics(get_task("qa/squad_v2"), max_length=rc.data.max_length, sync=False).bind(dm.raw["validation"], feats)
    for start in range(0, n, 512):
        idx = torch.arange(start, min(n, start + 512))
        logits = torch.zeros(len(idx), 16, 2)
        logits[:, 0, :] = 10.0  # the [CLS] (no answer) position wins everywhere
        metric.update_batch(logits, {"idx": idx})
    v = metric.compute()
    assert round(v["val/exact_match"], 4) == 52.1224 and round(v["val/f1"], 4) == 52.1224
    assert v["val/NoAns_exact"] == 100.0 and v["val/HasAns_exact"] == 0.0
    assert set(metric.last_predictions.values()) == {""}


def test_record_reads_candidates_and_scores_max_over_answers():
    from lightmods.data.record_metrics import RecordMetrics

    task = get_task("superglue/record")
    rows = read_local_split(task, str(DATA_DIRS["superglue/record"]), "validation")
    assert [len(r["entities"]) for r in rows] == [5, 5, 5] and rows[1]["answers"] == ["Lionel Messi", "Messi"]
    assert "@highlight" not in rows[0]["passage"]
    from lightmods.data.builders import encode

    class Tok:  # only the candidate bookkeeping matters here
        def __call__(self, a, b, **kw):
            return {"input_ids": [[0]] * len(a), "attention_mask": [[1]] * len(a)}

    feats = encode(task, rows, "validation", Tok(), 32)
    assert len(feats["idx"]) == 15 and feats["group"][:6] == [0, 0, 0, 0, 0, 1]
    m = RecordMetrics(task).bind(rows, feats)
    scores = torch.zeros(15, 2)
    scores[1, 1] = 5.0  # query 0 -> "Barcelona" (right)
    scores[9, 1] = 5.0  # query 1 -> "Messi" (a gold alias)
    scores[11, 1] = 5.0  # query 2 -> "Artemis" (wrong)
    m.update_batch(scores, {"idx": torch.arange(15)})
    v = m.compute()
    assert v["val/exact_match"] == pytest.approx(2 / 3) and v["val/f1"] == pytest.approx(2 / 3)


def test_ax_predicts_the_diagnostic_with_an_mnli_model(run_cfg, tmp_path):
    cfg = run_cfg("data=glue/ax", f"data.data_dir={data_dir('glue/ax', tmp_path)}", f"data.cache_dir={tmp_path / 'c'}")
    m = train(cfg)
    assert {"val/accuracy", "val/accuracy_mm", "val/score"} == set(m)  # MNLI validation; AX has no labels
    lines = (Path(cfg.paths.output_dir) / "predictions" / "AX.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 4


@pytest.mark.parametrize("task,test_keys", [("superglue/axb", {"test/mcc"}), ("superglue/axg", {"test/gender_parity", "test/accuracy"})])
def test_superglue_diagnostics_are_scored_with_an_rte_model(run_cfg, tmp_path, task, test_keys):
    cfg = run_cfg(f"data={task}", f"data.data_dir={data_dir(task, tmp_path)}", f"data.cache_dir={tmp_path / 'c'}")
    m = train(cfg)
    assert {"val/accuracy", "val/score"} | test_keys | {"test/score"} == set(m)
    out = Path(cfg.paths.output_dir) / "predictions"
    assert (out / f"{get_task(task).submission}.jsonl").exists() and (out / "test.jsonl").exists()


def test_gender_parity_counts_pairs_with_the_same_prediction():
    task = get_task("superglue/axg")
    m = TaskMetrics(task, prefix="test/")
    preds = torch.tensor([0, 0, 1, 0])  # pair 0 agrees, pair 1 does not
    m.update(torch.nn.functional.one_hot(preds, 2).float(), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    v = m.compute()
    assert v["test/gender_parity"] == pytest.approx(0.5) and v["test/accuracy"] == pytest.approx(0.75)
