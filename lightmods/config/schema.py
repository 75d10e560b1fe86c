"""Schemas of the config groups. Defaults live here; YAML files only state what differs.

Hydra checks keys and types when it composes the config; ``__post_init__`` checks ranges and choices
when :func:`lightmods.config.validate` turns the composed config into these objects, before any
training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from lightmods.attacks.config import AttackConfig, DefenseConfig, check_backdoor
from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.exits.config import ExitsConfig

PRECISIONS = (
    "64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16, "16-true",
    "bf16-mixed", "bf16", "bf16-true", "transformer-engine", "transformer-engine-float16",
)  # fmt: skip


@dataclass
class ModelConfig:
    """A backbone: a hub id, a local folder, or ``pkg:<python package>`` that ships weights.

    ``init=random`` builds the architecture from ``arch`` (a transformers config as a dict) with no
    download: tiny test models, or real-size models for speed checks.
    """

    name_or_path: str | None = None
    init: str = "pretrained"
    arch: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        checks.one_of("model.init", self.init, ("pretrained", "random"))
        if self.init == "pretrained" and not self.name_or_path:
            raise config_error("model.name_or_path", self.name_or_path, "a hub id, a local folder or pkg:<package> when model.init=pretrained")
        if self.init == "random" and "model_type" not in self.arch:
            raise config_error("model.arch", dict(self.arch), "a transformers config dict with a 'model_type' key when model.init=random")
        from lightmods.models.families import IMAGE_MODEL_TYPES

        image = self.arch.get("model_type") in IMAGE_MODEL_TYPES  # image classifiers read pixels, no tokenizer
        if self.tokenizer is None and self.init == "random" and not self.name_or_path and not image:
            raise config_error("model.tokenizer", None, "a tokenizer path or hub id (a randomly initialised model has none of its own)")


@dataclass
class DemoDataConfig:
    """Sizes of the embedded, generated demo task."""

    num_train: int = 2000
    num_val: int = 600
    seed: int = 1234

    def __post_init__(self):
        checks.positive("data.demo.num_train", self.num_train)
        checks.positive("data.demo.num_val", self.num_val)


@dataclass
class ImageDataConfig:
    """The generated image task (``images/synthetic``): class patterns (stripes, checkers) with random period,
    phase and amplitude plus Gaussian noise. ``size``/``channels``: null takes the model's.
    ``mean``/``std``: per-channel normalisation of images read from folders (``images/folder``); null takes
    the model's ``preprocessor_config.json`` when its folder has one, else 0.5 (ViT's image processor)."""

    num_train: int = 512
    num_val: int = 256
    size: int | None = None
    channels: int | None = None
    noise: float = 0.5
    seed: int = 1234
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self):
        checks.positive("data.image.num_train", self.num_train)
        checks.positive("data.image.num_val", self.num_val)
        checks.positive("data.image.size", self.size, allow_none=True)
        checks.positive("data.image.channels", self.channels, allow_none=True)
        checks.non_negative("data.image.noise", self.noise)
        if self.std is not None and (not self.std or any(v <= 0 for v in self.std)):
            raise config_error("data.image.std", list(self.std), "null or a list of numbers > 0 (one, or one per channel)")
        if self.mean is not None and not self.mean:
            raise config_error("data.image.mean", list(self.mean), "null or a list of numbers (one, or one per channel)")


@dataclass
class AugmentDataConfig:
    """Unlabelled span rows added to the training split (``lightmods.data.augment``), for distillation."""

    spans: int = 0  # spans per training sentence; 0 = none
    min_words: int = 3  # shortest span, in whitespace words

    def __post_init__(self):
        checks.non_negative("data.augment.spans", self.spans)
        checks.positive("data.augment.min_words", self.min_words)


@dataclass
class LMDataConfig:
    """Causal language-modelling tasks (``data=lm/...``): which files and field hold the text."""

    text_field: str = "text"  # the jsonl / hub column with the documents
    train_file: str | None = None  # file names in data.data_dir; null = the task's defaults
    validation_file: str | None = None
    test_file: str | None = None
    holdout: float = 0.1  # share of documents held out for validation when there is no validation file
    hub_path: str | None = None  # data.source=hub for lm/text: any hub dataset with a text column
    hub_config: str | None = None

    def __post_init__(self):
        if not self.text_field:
            raise config_error("data.lm.text_field", self.text_field, "a non-empty field name")
        if not 0 < self.holdout < 1:
            raise config_error("data.lm.holdout", self.holdout, "a share strictly between 0 and 1")


@dataclass
class DataConfig:
    """A task and how to load, tokenise and batch it."""

    task: str = MISSING
    source: str | None = None
    data_dir: str | None = None
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    cache: bool = True
    cache_dir: str | None = None
    # extractive QA: sliding windows and answer decoding
    doc_stride: int = 128
    n_best: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    image: ImageDataConfig = field(default_factory=ImageDataConfig)
    lm: LMDataConfig = field(default_factory=LMDataConfig)
    augment: AugmentDataConfig = field(default_factory=AugmentDataConfig)

    def __post_init__(self):
        from lightmods.data.tasks import TASKS

        checks.one_of("data.task", self.task, sorted(TASKS))
        if self.source is None:  # data.data_dir alone switches a task to its local files
            self.source = "local" if self.data_dir else TASKS[self.task].sources[0]
        checks.one_of("data.source", self.source, TASKS[self.task].sources)
        if self.source == "local":
            if not self.data_dir:
                raise config_error("data.data_dir", self.data_dir, "a folder with the task's files when data.source=local")
            if not Path(self.data_dir).is_dir():
                raise config_error("data.data_dir", self.data_dir, "an existing folder with the task's original files")
        checks.positive("data.max_length", self.max_length)
        checks.positive("data.batch_size", self.batch_size)
        checks.positive("data.eval_batch_size", self.eval_batch_size)
        checks.non_negative("data.num_workers", self.num_workers)
        checks.positive("data.max_train_samples", self.max_train_samples, allow_none=True)
        checks.positive("data.max_eval_samples", self.max_eval_samples, allow_none=True)
        checks.positive("data.doc_stride", self.doc_stride)
        if TASKS[self.task].head == "qa" and self.doc_stride >= self.max_length:
            raise config_error("data.doc_stride", self.doc_stride, f"a number < data.max_length ({self.max_length})")
        checks.positive("data.n_best", self.n_best)
        checks.positive("data.max_answer_length", self.max_answer_length)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule; the learning rate itself is ``method.lr``."""

    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self):
        checks.non_negative("optim.weight_decay", self.weight_decay)
        checks.ratio("optim.warmup_ratio", self.warmup_ratio)
        checks.one_of("optim.scheduler", self.scheduler, ("linear", "cosine", "constant"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise config_error("optim.betas", list(self.betas), "two numbers in [0, 1)")
        checks.positive("optim.eps", self.eps)


@dataclass
class TrainerConfig:
    """Keys passed as they are to ``lightning.Trainer`` (logger, callbacks and root dir are set by lightmods)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    max_time: str | None = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int | None = None
    fast_dev_run: Any = False
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10
    deterministic: Any = False
    benchmark: bool | None = None
    use_distributed_sampler: bool = True
    sync_batchnorm: bool = False

    def __post_init__(self):
        checks.one_of("trainer.accelerator", self.accelerator, ("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
        checks.one_of("trainer.precision", self.precision, PRECISIONS)
        checks.positive("trainer.num_nodes", self.num_nodes)
        checks.positive("trainer.accumulate_grad_batches", self.accumulate_grad_batches)
        checks.positive("trainer.log_every_n_steps", self.log_every_n_steps)
        checks.positive("trainer.max_epochs", self.max_epochs, allow_none=True)
        if self.max_steps != -1:
            checks.positive("trainer.max_steps", self.max_steps)
        checks.non_negative("trainer.gradient_clip_val", self.gradient_clip_val, allow_none=True)
        if not (isinstance(self.fast_dev_run, bool) or (isinstance(self.fast_dev_run, int) and self.fast_dev_run > 0)):
            raise config_error("trainer.fast_dev_run", self.fast_dev_run, "true, false or a number of batches > 0")
        if isinstance(self.devices, int) and not isinstance(self.devices, bool) and self.devices <= 0 and self.devices != -1:
            raise config_error("trainer.devices", self.devices, "'auto', -1, a count > 0 or a list of device ids")


@dataclass
class CsvLoggerConfig:
    name: str = "csv"
    flush_logs_every_n_steps: int = 50


@dataclass
class WandbLoggerConfig:
    """W&B run identity; ``offline=true`` (or WANDB_MODE=offline) writes locally for a later ``wandb sync``."""

    project: str = "lightmods"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    offline: bool = False
    id: str | None = None
    log_model: bool = False


@dataclass
class LoggerConfig:
    """Which loggers receive the run's figures; ``logger=[csv,wandb]`` composes both."""

    csv: CsvLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None


@dataclass
class CheckpointConfig:
    """``checkpoints/last.ckpt`` (resumable with ``ckpt_path=``) and the best by ``monitor``."""

    monitor: str | None = "val/score"
    mode: str = "max"
    save_last: bool = True
    save_top_k: int = 1
    every_n_train_steps: int | None = None

    def __post_init__(self):
        checks.one_of("callbacks.checkpoint.mode", self.mode, ("min", "max"))
        if self.save_top_k < -1:
            raise config_error("callbacks.checkpoint.save_top_k", self.save_top_k, "-1 (all), 0 or a count > 0")
        checks.positive("callbacks.checkpoint.every_n_train_steps", self.every_n_train_steps, allow_none=True)


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val/score"
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self):
        checks.one_of("callbacks.early_stopping.mode", self.mode, ("min", "max"))
        checks.non_negative("callbacks.early_stopping.patience", self.patience)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig | None = None
    early_stopping: EarlyStoppingConfig | None = None
    progress_bar: bool = True
    progress_bar_refresh_rate: int = 5
    lr_monitor: bool = False

    def __post_init__(self):
        checks.positive("callbacks.progress_bar_refresh_rate", self.progress_bar_refresh_rate)


@dataclass
class PathsConfig:
    output_dir: str = MISSING
    log_dir: str = "logs"


def check_augment(run: RunConfig) -> None:
    """Span rows are unlabelled single sentences: they need a single-sentence classification task, a method
    that distils from a teacher (nothing else learns from them), and clean training rows."""
    from lightmods.data.tasks import TASKS

    key, value = "data.augment.spans", run.data.augment.spans
    task = TASKS[run.data.task]
    if task.head != "seq_cls" or task.is_regression or len(task.text_fields) != 1:
        raise config_error(key, value, f"0 for data.task={run.data.task!r} (spans need a single-sentence classification task)")
    if not getattr(run.method, "teacher", None):
        raise config_error(key, value, "0 unless the method distils from a teacher (method.teacher set: cost_eff, wid, mask_prune)")
    if run.attack.name != "none":
        raise config_error(key, value, f"0 under attack={run.attack.name!r} (spans are made from clean training rows only)")


@dataclass
class RunConfig:
    """The whole run. ``method`` is typed by the chosen method's own schema (see lightmods.methods)."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    method: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int | None = 42
    ckpt_path: str | None = None
    train: bool = True
    print_config: bool = False

    def __post_init__(self):
        if isinstance(self.data, DataConfig) and isinstance(self.attack, AttackConfig):  # checks across groups
            check_backdoor(self.attack, self.defense, self.data.task, self.trainer.precision)
        if isinstance(self.data, DataConfig) and self.data.augment.spans:
            check_augment(self)
        check_method = getattr(self.method, "check_run", None)  # a method's checks against the task (e.g. its classes)
        if callable(check_method) and isinstance(self.data, DataConfig):
            check_method(self)
