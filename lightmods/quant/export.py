"""Export of a quantized model as integer codes, and its reload.

``export/quantized.safetensors`` holds, per quantized weight, ``<module>.weight.codes`` (the ``bits``-bit codes
packed back to back into uint8, :func:`pack_codes`) and ``<module>.weight.scale`` (its clipping factor, fp32),
and every other tensor of the model (biases, norms, position embeddings, unquantized heads) at full precision
under its plain transformers name. The safetensors metadata records each packed weight's shape and bits.
:func:`load_quantized` rebuilds the plain backbone, dequantizes the codes into its weights and returns a
model with exactly the trained quantized model's outputs.

:func:`compression_report` counts bytes: the fp32 model vs the packed codes + fp32 scales + the unquantized
tensors at fp32 (the paper's way of counting its 14.4x for 2-bit GPT-2), and the quantized weights alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightmods.quant.layers import QuantLayer, quant_layers
from lightmods.quant.quantizer import dequantize, pack_codes, packed_nbytes, unpack_codes

FILE = "quantized.safetensors"
CODES, SCALE = ".weight.codes", ".weight.scale"


def _unique_quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """Quantized layers, a weight shared by two of them (tied embedding and output layer) listed once."""
    seen, out = set(), []
    for name, layer in quant_layers(model):
        if id(layer.base_layer.weight) not in seen:
            seen.add(id(layer.base_layer.weight))
            out.append((name, layer))
    return out


def _plain_name(key: str) -> str:
    """A parameter name of the quantized model as the plain model calls it (``x.base_layer.bias`` -> ``x.bias``)."""
    return key.replace(".base_layer.", ".")


def export_quantized(model: nn.Module, out: Path) -> dict:
    """Write ``out / quantized.safetensors``; returns its byte figures."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    quantized_ids = set()
    for name, layer in _unique_quant_layers(model):
        w = layer.base_layer.weight
        tensors[name + CODES] = pack_codes(layer.codes(), layer.bits)
        tensors[name + SCALE] = layer.quantizer.clip().detach().float().cpu().reshape(())
        meta[name] = {"bits": layer.bits, "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}
        quantized_ids.add(id(w))
    seen = set(quantized_ids)
    for key, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if key.endswith(".quantizer.alpha") or id(p) in seen:
            continue
        if not _persistent(model, key):
            continue
        seen.add(id(p))
        tensors[_plain_name(key)] = p.detach().contiguous().cpu()
    save_file(tensors, out / FILE, metadata={"quantized": json.dumps(meta)})
    return {"file_bytes": (out / FILE).stat().st_size}


def _persistent(model: nn.Module, key: str) -> bool:
    """False for non-persistent buffers (not part of ``state_dict``)."""
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in getattr(module, "_non_persistent_buffers_set", set())


def load_quantized(path: str | Path, run_config: dict) -> nn.Module:
    """The exported quantized model as a plain transformers model whose weights are the dequantized codes."""
    path = Path(path)
    model = bare_backbone(run_config)
    with safe_open(str(path / FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["quantized"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    plain = {k: v for k, v in tensors.items() if not (k.endswith(CODES) or k.endswith(SCALE))}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    if unexpected:
        raise ValueError(f"{path / FILE}: tensors the model does not have: {unexpected[:5]}")
    loaded = set()
    with torch.no_grad():
        for name, m in meta.items():
            numel = 1
            for s in m["shape"]:
                numel *= s
            codes = unpack_codes(tensors[name + CODES], m["bits"], numel).view(m["shape"])
            weight = model.get_submodule(name).weight
            dtype = getattr(torch, m["dtype"])  # dequantize as training did (bf16-true: in bf16), then store
            scale = tensors[name + SCALE].to(dtype)
            weight.copy_(dequantize(codes.to(dtype), scale, m["bits"]).to(weight.dtype))
            loaded.add(id(weight))
    params = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict()
    left = [k for k in missing if id(params.get(k, state.get(k))) not in loaded and not _tied_to_loaded(model, k, plain)]
    if left:
        raise ValueError(f"{path / FILE} lacks tensors the model needs: {left[:5]}")
    return model.eval()


def _tied_to_loaded(model: nn.Module, key: str, loaded: dict) -> bool:
    """True when ``key`` is the same parameter as one the file held under another name (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(params.get(k) is p for k in loaded)


def bare_backbone(run_config: dict) -> nn.Module:
    """The backbone of a run's config without its method (the architecture the quantized weights fill)."""
    from omegaconf import OmegaConf

    from lightmods.config import validate
    from lightmods.data.images import resolve_task
    from lightmods.data.tasks import get_task
    from lightmods.models import build_backbone, build_tokenizer

    rc = validate(OmegaConf.create(run_config))
    task = resolve_task(get_task(rc.data.task), rc.data)
    return build_backbone(rc.model, task, build_tokenizer(rc.model) if task.modality == "text" else None)


def compression_report(model: nn.Module) -> dict:
    """Bytes and compression rates of the quantized model (relative to fp32 storage)."""
    layers = _unique_quant_layers(model)
    quantized_ids = {id(layer.base_layer.weight) for _, layer in layers}
    n_quant = sum(layer.base_layer.weight.numel() for _, layer in layers)
    packed = sum(packed_nbytes(layer.base_layer.weight.numel(), layer.bits) for _, layer in layers)
    scales = 4 * len(layers)
    rest = 0
    seen = set(quantized_ids)
    for key, p in model.named_parameters():  # deduplicated: a tied weight counts once
        if key.endswith(".quantizer.alpha") or id(p) in seen:
            continue
        seen.add(id(p))
        rest += p.numel()
    fp32_model = 4 * (n_quant + rest)
    quant_model = packed + scales + 4 * rest
    bits = sorted({layer.bits for _, layer in layers})
    return {
        "quant_bits": bits[0] if len(bits) == 1 else bits,
        "quantized_modules": len(layers),
        "quantized_params": n_quant,
        "unquantized_params": rest,
        "quantized_weights_bytes_fp32": 4 * n_quant,
        "quantized_weights_bytes_packed": packed + scales,
        "compression_rate_quantized_weights": round(4 * n_quant / max(packed + scales, 1), 3),
        "model_bytes_fp32": fp32_model,
        "model_bytes_quantized": quant_model,
        "compression_rate": round(fp32_model / max(quant_model, 1), 3),
        "compression_basis": "fp32 bytes of the whole model / (packed codes + fp32 scales + the unquantized tensors at fp32)",
    }
