"""Step time and training memory of an SPT model against the same model with SPT switched off (the same
LoRA adapters, dense attention and the full FFN: plain LoRA), on one synthetic batch.

Memory is measured as the bytes of the tensors autograd saves for backward (activations; parameters not
counted), which is what sparse attention and the routed FFN shrink, and which a CPU process cannot otherwise
separate from its other allocations; on CUDA the peak allocated memory is reported too.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from lightmods.spt.attention import SparseAttentionState
from lightmods.spt.ffn import BlockRouter


@contextlib.contextmanager
def spt_disabled(model: nn.Module, attn_implementation: str):
    """Inside, ``model`` runs as plain LoRA: the original attention implementation, every FFN block."""
    switches = [m for m in model.modules() if isinstance(m, (SparseAttentionState, BlockRouter))]
    saved = model.config._attn_implementation
    model.config._attn_implementation = attn_implementation
    for m in switches:
        m.enabled = False
    try:
        yield model
    finally:
        model.config._attn_implementation = saved
        for m in switches:
            m.enabled = True


def saved_activation_bytes(model: nn.Module, fn) -> tuple[object, int]:
    """Runs ``fn()``; returns its result and the bytes of distinct non-parameter storages saved for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure_training_step(model: nn.Module, batch: dict, steps: int) -> dict:
    """Median seconds of forward + backward, saved-activation MB and (CUDA) peak MB over ``steps`` steps."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    times, act = [], 0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps + 1):  # one warm-up step
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out, act = saved_activation_bytes(model, lambda: model(**batch).logits)
        out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        del out
    for p in model.parameters():
        p.grad = None
    res = {"step_time_s": round(sorted(times[1:])[len(times[1:]) // 2], 5), "activation_memory_mb": round(act / 2**20, 3)}
    if cuda:
        res["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return res


def compare_with_lora(model: nn.Module, attn_implementation: str, batch_size: int, length: int, steps: int) -> dict:
    """SPT vs the same model as plain LoRA on a random batch; model state, codebooks and RNG are restored."""
    cfg = model.config
    length = min(length, getattr(cfg, "max_position_embeddings", length) or length)
    device = next(model.parameters()).device
    buffers = {k: v.clone() for k, v in model.state_dict().items() if ".spt_attn." in k}
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        ids = torch.randint(5, cfg.vocab_size, (batch_size, length), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        model.train()
        spt = measure_training_step(model, batch, steps)
        with spt_disabled(model, attn_implementation):
            lora = measure_training_step(model, batch, steps)
    model.train(was_training)
    model.load_state_dict(buffers, strict=False)
    out = {"batch_size": batch_size, "length": length, "spt": spt, "lora": lora}
    out["step_time_ratio_lora_over_spt"] = round(lora["step_time_s"] / spt["step_time_s"], 3)
    out["activation_memory_ratio_spt_over_lora"] = round(spt["activation_memory_mb"] / max(lora["activation_memory_mb"], 1e-9), 3)
    return out
