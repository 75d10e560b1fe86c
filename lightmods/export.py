"""``export/``: the trained model in a form other tools load without lightmods.

- LoRA-family adapters (LoRA; MoSLoRA with its mixer folded into A, which is exact) are written in HF
  PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` (task head and BERT pooler as
  ``modules_to_save``), next to ``base/``, the frozen base model with the task head's config, so that
  ``peft.AutoPeftModelForSequenceClassification.from_pretrained(export_dir)`` reproduces the outputs.
- Full fine-tuning, and adapters that are all mergeable but not LoRA-shaped (e.g. LoRETTA_rep's tensor
  trains): a plain transformers model (``save_pretrained``), the adapters merged into the weights.
- Quantized models (``method=quant``): ``quantized.safetensors``, the weights as bit-packed integer codes plus
  per-module scales (``lightmods/quant/export.py``), dequantized into the plain model on load.
- Methods that neither can express (e.g. bottleneck adapters): ``model.safetensors`` plus ``lightmods.json``
  (the run config), loaded back by :func:`load_export`.
Every export records its kind in ``lightmods.json``; :func:`load_export` loads all three back.
A model that a method marks with :data:`MERGE_ON_EXPORT` (modules no transformers class has, e.g. SPT's
routers and codebooks) is written in the lightmods format with its adapters merged (``adapters_merged``);
:func:`load_export` rebuilds it, strips the fresh adapters and loads the merged weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightmods.peft import LoraLinear, adapter_layers
from lightmods.peft.inject import match_module, merge_adapters
from lightmods.peft.moslora import MoSLoraLinear
from lightmods.quant import quant_layers
from lightmods.quant.export import export_quantized, load_quantized

MERGE_ON_EXPORT = "_lightmods_merge_on_export"  # model attribute: lightmods format, adapters merged


def _lora_factors(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``delta = scaling * B A``; MoSLoRA's mixer is folded into A."""
    a = layer.lora_A.weight
    if isinstance(layer, MoSLoraLinear):
        a = layer.lora_mixer.weight @ a
    return a.detach().contiguous(), layer.lora_B.weight.detach().contiguous()


def strip_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """A copy of ``model`` with every adapter layer replaced by the base layer it wraps; with ``merge``, the
    adapters are merged into those base layers first (every adapter layer must be mergeable)."""
    bare = copy.deepcopy(model)
    if merge:
        fixed = [name for name, layer in adapter_layers(bare) if not layer.mergeable]
        if fixed:
            raise ValueError(f"cannot merge the adapters of {', '.join(fixed)}: not linear in their input")
        merge_adapters(bare)
    for name, _ in list(adapter_layers(bare)):
        parent_name, _, child = name.rpartition(".")
        parent = bare.get_submodule(parent_name) if parent_name else bare
        setattr(parent, child, getattr(parent, child).base_layer)
    return bare


def export_kind(model: nn.Module, method_name: str) -> str:
    layers = [layer for _, layer in adapter_layers(model)]
    if layers and all(isinstance(layer, LoraLinear) for layer in layers) and len({layer.scaling * layer.rank for layer in layers}) == 1:
        return "peft_lora"
    if not layers and method_name in ("full_ft", "gs_lora"):  # gs_lora: every group of the last task was zero
        return "transformers"
    if not layers and reapplies(method_name):  # plain weights; load_export re-applies the method
        return "transformers"
    if layers and all(layer.mergeable for layer in layers):
        return "transformers"  # merged into the base weights
    return "lightmods"


def export_model(
    model: nn.Module, out: Path, run_config: dict, head_patterns: tuple[str, ...], method_name: str, plan=None
) -> Path:
    """Write ``out`` (``export/``) for ``model``; returns the folder."""
    out.mkdir(parents=True, exist_ok=True)
    # A structurally pruned model has per-layer sizes no transformers config can state: lightmods format,
    # with the pruning plan that rebuilds its shapes.
    # Exit heads (``exits``, COST-EFF) are modules no transformers class has: lightmods format too.
    custom = getattr(model, MERGE_ON_EXPORT, False)
    kind = "lightmods" if plan is not None or hasattr(model, "exit_heads") or custom else export_kind(model, method_name)
    merged = False
    if next(quant_layers(model), None) is not None:  # method=quant: bit-packed integer codes + scales
        kind = "quantized"
        export_quantized(model, out)
    elif kind == "peft_lora":
        _export_peft(model, out, head_patterns)
    elif kind == "transformers":
        has_adapters = next(adapter_layers(model), None) is not None
        (strip_adapters(model, merge=True) if has_adapters else model).save_pretrained(out)
    else:
        merged = custom and next(adapter_layers(model), None) is not None
        state = (strip_adapters(model, merge=True) if merged else model).state_dict()
        save_file({k: v.detach().contiguous() for k, v in state.items()}, out / "model.safetensors")
    meta = {"kind": kind, "config": run_config, "plan": plan.to_dict() if plan is not None else None}
    if merged:
        meta["adapters_merged"] = True
    if kind == "transformers" and reapplies(method_name):
        meta["reapply_method"] = True
    (out / "lightmods.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if plan is not None:
        (out / "pruning_plan.json").write_text(json.dumps(plan.to_dict()) + "\n")
    return out


def _export_peft(model: nn.Module, out: Path, head_patterns: tuple[str, ...]) -> None:
    layers = list(adapter_layers(model))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        a, b = _lora_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    saved_heads = []
    for name, module in model.named_modules():
        if name and match_module(name, head_patterns) and any(p.requires_grad for p in module.parameters()):
            saved_heads.append(name.split(".")[-1])
            for pname, p in module.named_parameters():
                tensors[f"base_model.model.{name}.{pname}"] = p.detach().contiguous()
    save_file(tensors, out / "adapter_model.safetensors")
    strip_adapters(model).save_pretrained(out / "base")
    first = layers[0][1]
    image = type(model).__name__.endswith("ForImageClassification")  # PEFT has no image task type
    config = {
        "peft_type": "LORA", "task_type": None if image else "SEQ_CLS", "r": first.rank, "lora_alpha": first.scaling * first.rank,
        "lora_dropout": 0.0, "target_modules": [n for n, _ in layers], "modules_to_save": sorted(set(saved_heads)),
        "base_model_name_or_path": str((out / "base").resolve()), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_export(path: str | Path) -> nn.Module:
    """The exported model, ready for inference, whatever its kind (PEFT adapters come back merged)."""
    path = Path(path)
    meta = json.loads((path / "lightmods.json").read_text())
    if meta["kind"] == "quantized":
        return load_quantized(path, meta["config"])
    if meta["kind"] == "transformers":
        model = auto_class(path).from_pretrained(path)
        if meta.get("reapply_method"):
            model = reapply_method(model, meta["config"]["method"])
        return model.eval()
    if meta["kind"] == "peft_lora":
        return _load_peft_merged(path).eval()
    model = rebuild_model(meta["config"], meta.get("plan"))
    if meta.get("adapters_merged"):
        model = strip_adapters(model)  # fresh adapters: the merged weights replace their base layers
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval()


def reapplies(method_name: str) -> bool:
    """Whether ``method_name`` changes the model without parameters of its own (``Method.export_reapplies``)."""
    from lightmods.methods import METHODS

    return bool(getattr(METHODS.get(method_name), "export_reapplies", False))


def reapply_method(model: nn.Module, method_config: dict) -> nn.Module:
    """``model`` (plain weights) prepared again by the method of ``method_config`` (the run config's
    ``method`` section, checked against the method's schema)."""
    from omegaconf import OmegaConf

    from lightmods.methods import METHODS, build_method
    from lightmods.models import family_of

    schema = METHODS[method_config["name"]].Config
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), method_config))
    return build_method(config).prepare(model, family_of(model))


def auto_class(path: str | Path):
    """The transformers auto class that loads the saved model at ``path`` with its head."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    archs = AutoConfig.from_pretrained(path).architectures or []
    if any(a.endswith("ForQuestionAnswering") for a in archs):
        return AutoModelForQuestionAnswering
    if any(a.endswith("ForImageClassification") for a in archs):
        return AutoModelForImageClassification
    if any(a.endswith("ForCausalLM") for a in archs):
        return AutoModelForCausalLM
    return AutoModelForSequenceClassification


def rebuild_model(run_config: dict, plan: dict | None = None) -> nn.Module:
    """The model a run trained, as its config builds it (backbone, method, pruning plan), weights not loaded."""
    from omegaconf import OmegaConf

    from lightmods.config import validate
    from lightmods.data.tasks import get_task
    from lightmods.methods import build_method
    from lightmods.models import build_backbone, build_tokenizer, family_of

    rc = validate(OmegaConf.create(run_config))
    from lightmods.data.images import resolve_task

    task = resolve_task(get_task(rc.data.task), rc.data)  # images/folder: class names from the folders
    model = build_backbone(rc.model, task, build_tokenizer(rc.model) if task.modality == "text" else None)
    method = build_method(rc.method)
    model = method.prepare(model, family_of(model))
    from lightmods.exits.training import attach_from_config

    attach_from_config(model, rc.exits, task, method)
    if plan:
        from lightmods.structure import PruningPlan
        from lightmods.structure.surgery import forget_origins

        model = method.restructure(model, PruningPlan.from_dict(plan))
        forget_origins(model)  # no optimizer state to carry; do not keep the unsliced tensors alive
    return model


def load_checkpoint_model(path: str | Path) -> nn.Module:
    """The model of a training checkpoint (``last.ckpt``, best), pruned as it was, trainable flags as in
    training, loaded with ``weights_only=True``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("lightmods", {})
    model = rebuild_model(meta["config"], meta.get("plan"))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model


def _load_peft_merged(path: Path) -> nn.Module:
    """Base model + LoRA deltas folded into the weights + saved head modules, without the peft package."""
    config = json.loads((path / "adapter_config.json").read_text())
    model = auto_class(path / "base").from_pretrained(path / "base")
    tensors = load_file(path / "adapter_model.safetensors")
    scaling = config["lora_alpha"] / config["r"]
    prefix = "base_model.model."
    with torch.no_grad():
        for name in config["target_modules"]:
            a, b = tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"]
            model.get_submodule(name).weight += scaling * (b @ a)
        own = dict(model.named_parameters())
        for key, value in tensors.items():
            if ".lora_" not in key:
                own[key[len(prefix):]].copy_(value)
    return model
