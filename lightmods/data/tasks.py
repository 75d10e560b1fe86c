"""The task registry: where a task's data comes from, what its rows look like, how inputs are built
and how it is scored.

Rows use the hub's column names (GLUE from ``nyu-mll/glue``, SuperGLUE from ``aps/super_glue``,
SQuAD from ``rajpurkar/squad[_v2]``) whatever the source, plus ``idx`` and ``label`` (a class index,
a float for regression, ``None`` when a split has no labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightmods.errors import config_error


@dataclass(frozen=True)
class TaskSpec:
    """One task.

    ``label_names=None`` means regression. ``metrics`` are averaged into ``val/score``. ``eval_splits``
    maps each evaluated split to the suffix its metric names get (MNLI: matched ``""``, mismatched
    ``"_mm"``). ``local_files`` maps a split to its file name(s) in ``data.data_dir``;
    ``local_columns`` maps row columns to GLUE tsv header names (an int: a column position, for
    header-less files). A diagnostic task names its ``base``: it trains and validates on the base task's
    data and scores (or, without labels, only predicts) its own test file with its own metrics.
    ``holdout``: when the train and validation splits resolve to the same local file (a source with one
    labelled file), validation is this fixed, label-stratified share of its rows and train the rest.
    """

    name: str
    benchmark: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    sources: tuple[str, ...] = ("hub", "local")
    head: str = "seq_cls"
    builder: str = "text"
    hub_path: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    local_format: str | None = None
    local_files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    local_columns: dict[str, str | int] = field(default_factory=dict)
    eval_splits: dict[str, str] = field(default_factory=lambda: {"validation": ""})
    submission: str | None = None
    num_choices: int = 0
    base: str | None = None
    column_renames: dict[str, str] = field(default_factory=dict)
    holdout: float | None = None

    @property
    def is_regression(self) -> bool:
        return self.label_names is None and self.head not in ("qa", "causal_lm")

    @property
    def modality(self) -> str:
        """``image`` for image classification (``pixel_values`` in, no tokenizer), ``text`` otherwise."""
        return "image" if self.head == "image_cls" else "text"

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


GLUE_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
GLUE_FILES = {"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)}
SG_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
SG_FILES = {"train": ("train.jsonl",), "validation": ("val.jsonl", "dev.jsonl"), "test": ("test.jsonl",)}
ENTAIL2 = ("entailment", "not_entailment")
SYNTHETIC_PATTERNS = ("horizontal", "vertical", "diagonal", "checker")  # classes of images/synthetic


def _glue(name, fields, labels, metrics, columns, submission, **kw) -> TaskSpec:
    return TaskSpec(
        name=f"glue/{name}", benchmark="glue", text_fields=fields, label_names=labels, metrics=metrics,
        hub_path="nyu-mll/glue", hub_config=kw.pop("hub_config", name), hub_splits=kw.pop("hub_splits", GLUE_SPLITS),
        local_format="glue_tsv", local_files=kw.pop("local_files", GLUE_FILES), local_columns=columns,
        submission=submission, **kw,
    )  # fmt: skip


def _superglue(name, fields, labels, metrics, submission, **kw) -> TaskSpec:
    return TaskSpec(
        name=f"superglue/{name}", benchmark="superglue", text_fields=fields, label_names=labels, metrics=metrics,
        hub_path="aps/super_glue", hub_config=kw.pop("hub_config", name), hub_splits=kw.pop("hub_splits", SG_SPLITS),
        local_format="jsonl", local_files=kw.pop("local_files", SG_FILES), submission=submission, **kw,
    )  # fmt: skip


_MNLI_COLUMNS = {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}
_MNLI_LABELS = ("entailment", "neutral", "contradiction")

_TASKS = [
    TaskSpec(
        name="demo", benchmark="demo", text_fields=("sentence",), label_names=("negative", "positive"),
        metrics=("accuracy", "f1"), sources=("generated",),
    ),  # fmt: skip
    # GLUE
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc",),
          {"label": 1, "sentence": 3}, "CoLA"),
    _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), {"sentence": "sentence", "label": "label"}, "SST-2",
          local_files={"train": ("train.tsv", "train_k16.tsv"), "validation": ("dev.tsv",), "test": ("test.tsv",)}),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
          {"label": "Quality", "sentence1": "#1 String", "sentence2": "#2 String"}, "MRPC"),
    _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"),
          {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, "STS-B"),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
          {"question1": "question1", "question2": "question2", "label": "is_duplicate"}, "QQP"),
    _glue("mnli", ("premise", "hypothesis"), _MNLI_LABELS, ("accuracy",), _MNLI_COLUMNS, "MNLI",
          hub_splits={"train": "train", "validation_matched": "validation_matched",
                      "validation_mismatched": "validation_mismatched", "test_matched": "test_matched",
                      "test_mismatched": "test_mismatched"},
          local_files={"train": ("train.tsv",), "validation_matched": ("dev_matched.tsv",),
                       "validation_mismatched": ("dev_mismatched.tsv",), "test_matched": ("test_matched.tsv",),
                       "test_mismatched": ("test_mismatched.tsv",)},
          eval_splits={"validation_matched": "", "validation_mismatched": "_mm"}),
    _glue("qnli", ("question", "sentence"), ENTAIL2, ("accuracy",),
          {"question": "question", "sentence": "sentence", "label": "label"}, "QNLI"),
    _glue("rte", ("sentence1", "sentence2"), ENTAIL2, ("accuracy",),
          {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, "RTE"),
    _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
          {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, "WNLI"),
    _glue("ax", ("premise", "hypothesis"), _MNLI_LABELS, ("accuracy",), _MNLI_COLUMNS, "AX", base="glue/mnli",
          hub_splits={"test": "test"}, local_files={"test": ("AX.tsv", "diagnostic.tsv")},
          eval_splits={"validation_matched": "", "validation_mismatched": "_mm"}),
    # SuperGLUE
    _superglue("boolq", ("question", "passage"), ("False", "True"), ("accuracy",), "BoolQ"),
    _superglue("cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"), ("accuracy", "macro_f1"), "CB"),
    _superglue("copa", ("premise", "choice1", "choice2", "question"), ("choice1", "choice2"), ("accuracy",), "COPA",
               head="multiple_choice", builder="copa", num_choices=2),
    _superglue("multirc", ("paragraph", "question", "answer"), ("False", "True"), ("f1a", "em"), "MultiRC",
               builder="multirc"),
    _superglue("record", ("passage", "query"), ("False", "True"), ("f1", "exact_match"), "ReCoRD", builder="record"),
    _superglue("rte", ("premise", "hypothesis"), ENTAIL2, ("accuracy",), "RTE"),
    _superglue("wic", ("word", "sentence1", "sentence2"), ("False", "True"), ("accuracy",), "WiC", builder="wic"),
    _superglue("wsc", ("text", "span1_text", "span2_text"), ("False", "True"), ("accuracy",), "WSC",
               builder="wsc", hub_config="wsc.fixed"),
    _superglue("axb", ("premise", "hypothesis"), ENTAIL2, ("mcc",), "AX-b", base="superglue/rte",
               hub_splits={"test": "test"}, local_files={"test": ("AX-b.jsonl", "axb.jsonl")},
               column_renames={"sentence1": "premise", "sentence2": "hypothesis"}),
    _superglue("axg", ("premise", "hypothesis"), ENTAIL2, ("gender_parity", "accuracy"), "AX-g", base="superglue/rte",
               hub_splits={"test": "test"}, local_files={"test": ("AX-g.jsonl", "axg.jsonl")}),
    # Backdoor sets (thunlp/StyleAttack's clean files; see attack= for poisoning). Dev is the evaluated split.
    *(TaskSpec(name=f"backdoor/{name}", benchmark="backdoor", text_fields=("sentence",), label_names=labels,
               metrics=("accuracy",), sources=("local",), local_format="backdoor_tsv",
               local_files={"train": ("train.tsv",), "validation": ("dev.tsv",)})
      for name, labels in (("sst2", ("negative", "positive")), ("olid", ("not_offensive", "offensive")),
                           ("hatespeech", ("no_hate", "hate")))),
    # AG News (4 topics): the StyleAttack 999-row sample has one file; validation is a fixed 40% of it.
    TaskSpec(name="backdoor/ag", benchmark="backdoor", text_fields=("sentence",),
             label_names=("world", "sports", "business", "sci_tech"), metrics=("accuracy",), sources=("local",),
             local_format="backdoor_tsv", local_files={"train": ("train.tsv", "test_1000.tsv"),
                                                       "validation": ("dev.tsv", "test_1000.tsv")}, holdout=0.4),
    # Images: a generated pattern-classification task (no download) for image classifiers (ViT)
    TaskSpec(name="images/synthetic", benchmark="images", text_fields=(), label_names=SYNTHETIC_PATTERNS,
             metrics=("accuracy",), sources=("generated",), head="image_cls", builder="image"),
    # Images from local folders (data.data_dir with train/<class>/* and val/<class>/*): the class names are
    # the sorted folder names, set when the run starts (lightmods.data.images.resolve_task)
    TaskSpec(name="images/folder", benchmark="images", text_fields=(), label_names=(), metrics=("accuracy",),
             sources=("local",), head="image_cls", builder="image_folder"),
    # Causal language modelling: documents cut into blocks of data.max_length tokens, scored by perplexity
    # (val/score = -perplexity, so higher is better as for every other task). See lightmods/data/lm.py.
    TaskSpec(name="lm/text", benchmark="lm", text_fields=("text",), label_names=None, metrics=("perplexity",),
             sources=("hub", "local"), head="causal_lm", builder="lm", local_format="lm",
             local_files={"train": ("train.txt", "train.jsonl"),
                          "validation": ("validation.txt", "valid.txt", "validation.jsonl", "val.jsonl"),
                          "test": ("test.txt", "test.jsonl")}),
    TaskSpec(name="lm/wikitext2", benchmark="lm", text_fields=("text",), label_names=None, metrics=("perplexity",),
             head="causal_lm", builder="lm", hub_path="Salesforce/wikitext", hub_config="wikitext-2-raw-v1",
             hub_splits={"train": "train", "validation": "validation", "test": "test"}, local_format="lm",
             local_files={"train": ("wiki.train.raw", "wiki.train.tokens"), "validation": ("wiki.valid.raw", "wiki.valid.tokens"),
                          "test": ("wiki.test.raw", "wiki.test.tokens")}),
    # Extractive QA
    TaskSpec(
        name="qa/squad", benchmark="qa", text_fields=("question", "context"), label_names=None,
        metrics=("exact_match", "f1"), head="qa", builder="squad", hub_path="rajpurkar/squad",
        hub_splits={"train": "train", "validation": "validation"}, local_format="squad_json",
        local_files={"train": ("train-v1.1.json",), "validation": ("dev-v1.1.json",)},
    ),
    TaskSpec(
        name="qa/squad_v2", benchmark="qa", text_fields=("question", "context"), label_names=None,
        metrics=("exact_match", "f1"), head="qa", builder="squad_v2", hub_path="rajpurkar/squad_v2",
        hub_splits={"train": "train", "validation": "validation"}, local_format="squad_json",
        local_files={"train": ("train-v2.0.json",), "validation": ("dev-v2.0.json",)},
    ),
]  # fmt: skip

TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise config_error("data.task", name, "one of " + ", ".join(sorted(TASKS)))
    return TASKS[name]
