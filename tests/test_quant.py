"""method=quant (Tao et al., ACL 2022): the quantizer's levels and clipping, straight-through gradients against
a hand reference, learnable module-wise scales, bit-width vs fidelity, the token-level contrastive loss against
a hand-computed InfoNCE, bit packing, export byte counts and exact reload, end-to-end runs on tiny encoder and
decoder models (classification and causal LM), and config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lightmods.config import validate
from lightmods.errors import ConfigError
from lightmods.export import load_checkpoint_model, load_export
from lightmods.losses.contrastive import TokenMemoryBank, token_contrastive_loss
from lightmods.quant import (
    WeightQuantizer,
    fake_quantize,
    pack_codes,
    packed_nbytes,
    quant_layers,
    unpack_codes,
)
from lightmods.run import train
from tests.conftest import FAST, compose_run
from tests.test_peft import build


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizer_has_2_to_the_bits_levels_within_the_clip(bits):
    torch.manual_seed(0)
    w = torch.randn(20000)
    alpha = torch.tensor(1.5)
    q = fake_quantize(w, alpha, bits)
    levels = torch.unique(q)
    assert levels.numel() == 2**bits
    assert levels.abs().max() <= alpha + 1e-6 and torch.isclose(levels.max(), alpha)
    steps = levels.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, 2 * 1.5 / (2**bits - 1)))  # evenly spaced
    err = (q - w.clamp(-1.5, 1.5)).abs()
    assert err.max() <= 1.5 / (2**bits - 1) + 1e-6  # rounding to the nearest level


def test_straight_through_gradients_match_the_reference():
    torch.manual_seed(1)
    bits, L = 3, 7
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(64, dtype=torch.float64)
    (fake_quantize(w, alpha, bits) * g).sum().backward()
    with torch.no_grad():
        inside = w.abs() < alpha
        u = w / alpha
        q_over_alpha = torch.round((u.clamp(-1, 1) + 1) * L / 2) * 2 / L - 1
        ref_w = g * inside  # identity inside the clip, zero outside
        ref_alpha = (g * torch.where(inside, q_over_alpha - u, torch.sign(w))).sum()  # the paper's scaling gradient
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(w.grad, ref_w)
    torch.testing.assert_close(alpha.grad, ref_alpha)


@pytest.mark.parametrize("how", ["mse", "mean_abs", "max_abs"])
def test_scale_initialisation_from_weight_statistics(how):
    torch.manual_seed(0)
    w = torch.randn(256, 128)
    a2, a8 = WeightQuantizer(w, 2, how).alpha.item(), WeightQuantizer(w, 8, how).alpha.item()
    if how == "mean_abs":
        assert a2 == pytest.approx(w.abs().mean().item())
    elif how == "max_abs":
        assert a2 == pytest.approx(w.abs().max().item())
    else:  # the MSE-optimal clip grows with the bits and beats the unclipped one at 2 bits
        assert a2 < a8
        err = lambda a: (fake_quantize(w, torch.tensor(a), 2) - w).pow(2).sum()  # noqa: E731
        assert err(a2) < err(w.abs().max().item())


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_round_trips_in_the_expected_bytes(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 37))  # 111 codes: a partial last byte for most widths
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(111 * bits / 8) == packed_nbytes(111, bits)
    assert torch.equal(unpack_codes(packed, bits, 111).view(3, 37), codes)


def test_learnable_scales_receive_gradients_and_train(tmp_path):
    net, m, batch = build("tiny", "quant", tmp_path / "a", "method.bits=2")
    layers = dict(quant_layers(net))
    assert "bert.embeddings.word_embeddings" in layers and "bert.encoder.layer.1.output.dense" in layers
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in layers)  # heads stay full precision
    net(**batch).logits.pow(2).sum().backward()
    for name, layer in layers.items():
        assert layer.quantizer.alpha.grad is not None and layer.quantizer.alpha.grad != 0, name
        assert layer.base_layer.weight.grad is not None, name
    frozen, _, _ = build("tiny", "quant", tmp_path / "b", "method.learn_scale=false", "method.scale_init=max_abs")
    assert not any(layer.quantizer.alpha.requires_grad for _, layer in quant_layers(frozen))


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_eight_bits_stay_close_to_full_precision_two_bits_do_not(tmp_path, model):
    diffs = {}
    for bits in (8, 2):
        net, m, batch = build(model, "quant", tmp_path / str(bits), f"method.bits={bits}")
        net.eval()
        with torch.no_grad():
            diffs[bits] = (net(**batch).logits - m.teacher(**batch).logits).abs().max().item()
            scale = m.teacher(**batch).logits.abs().max().item()
    assert diffs[8] < 0.01 * scale
    assert diffs[2] > 10 * diffs[8]


def _infonce_by_hand(s, t, ids, T, bank=None, bank_ids=None):
    total = 0.0
    for i in range(len(s)):
        cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
        pos = math.exp(cos(s[i], t[i]) / T)
        denom = pos + sum(math.exp(cos(s[i], t[j]) / T) for j in range(len(t)) if j != i and ids[j] != ids[i])
        if bank is not None:
            denom += sum(math.exp(cos(s[i], bank[j]) / T) for j in range(len(bank)) if bank_ids[j] != ids[i])
        total += -math.log(pos / denom)
    return total / len(s)


def test_contrastive_loss_equals_hand_computed_infonce():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ids = torch.tensor([7, 3, 7, 9, 1])  # token 7 twice: its occurrences are not each other's negatives
    bank, bank_ids = torch.randn(3, 4, dtype=torch.float64), torch.tensor([3, 2, 7])
    got = token_contrastive_loss(s, t, ids, 0.5)
    assert got.item() == pytest.approx(_infonce_by_hand(s, t, ids, 0.5), rel=1e-6)
    got = token_contrastive_loss(s, t, ids, 0.5, bank, bank_ids)
    assert got.item() == pytest.approx(_infonce_by_hand(s, t, ids, 0.5, bank, bank_ids), rel=1e-6)
    s.requires_grad_(True)
    token_contrastive_loss(s, t, ids, 0.5).backward()
    assert s.grad.abs().sum() > 0  # the student is pulled; the teacher is a fixed target
    # a student equal to the teacher scores lower than a shuffled one
    assert token_contrastive_loss(t, t, ids, 0.1) < token_contrastive_loss(t[[1, 2, 3, 4, 0]], t, ids, 0.1)


def test_memory_bank_is_a_fifo_of_normalised_teacher_tokens():
    bank = TokenMemoryBank(4)
    assert bank.contents() == (None, None)
    bank.push(torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), torch.tensor([1, 2, 3]))
    bank.push(torch.tensor([[0.0, -5.0], [4.0, 0.0]]), torch.tensor([4, 5]))
    keys, ids = bank.contents()
    assert ids.tolist() == [5, 2, 3, 4]  # the oldest entry was overwritten
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(4))
    restored = TokenMemoryBank(4)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.contents()[1], ids) and restored.ptr == bank.ptr


def _check_export(run_dir: Path, batch_of) -> dict:
    """Export byte counts as the summary says, and the reloaded export equal to the trained model."""
    summary = json.loads((run_dir / "summary.json").read_text())
    export = run_dir / "export"
    assert json.loads((export / "lightmods.json").read_text())["kind"] == "quantized"
    trained = load_checkpoint_model(run_dir / "checkpoints" / "last.ckpt").eval()
    with safe_open(str(export / "quantized.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["quantized"])
        packed = sum(f.get_tensor(k + ".weight.codes").numel() for k in meta)
        numel = sum(math.prod(m["shape"]) for m in meta.values())
        keys = list(f.keys())
    bits = summary["quant_bits"]
    assert numel == summary["quantized_params"] and len(meta) == summary["quantized_modules"]
    assert packed == sum(packed_nbytes(math.prod(m["shape"]), bits) for m in meta.values())
    assert packed + 4 * len(meta) == summary["quantized_weights_bytes_packed"]
    assert not any(".base_layer." in k or "alpha" in k for k in keys)
    reloaded = load_export(export)
    assert next(quant_layers(reloaded), None) is None  # a plain model with dequantized weights
    batch = batch_of(trained)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)
    return summary


def test_end_to_end_on_tiny_bert(run_cfg):
    cfg = run_cfg("method=quant", "method.bits=4", "method.lr=1e-3", "method.hard_weight=1.0", "method.memory_bank=64")
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert "val/score" in metrics
    log = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss_contrast" in log and "train/loss_distill" in log
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    summary = _check_export(run_dir, lambda m: {"input_ids": ids})
    assert summary["quant_bits"] == 4 and summary["val_score"] == metrics["val/score"]
    assert 7.5 < summary["compression_rate_quantized_weights"] <= 8 and 1 < summary["compression_rate"] < 8
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["callbacks"]["QuantTraining"]["bank"]["filled"] == 64  # the memory bank is resumable state


def test_end_to_end_causal_lm_with_tied_embeddings(run_cfg, tmp_path):
    """A tiny LLaMA language model whose output layer is tied to the word embedding: both read one quantizer,
    the export stores the tied weight once, and the reload matches."""
    data = tmp_path / "corpus"
    data.mkdir()
    words = "the a cat dog sat ran on under mat log quickly slowly".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist()) for _ in range(80)]
    (data / "train.txt").write_text("\n".join(lines[:64]) + "\n")
    (data / "validation.txt").write_text("\n".join(lines[64:]) + "\n")
    cfg = run_cfg(
        "model=tiny_llama", "+model.arch.tie_word_embeddings=true", "data=lm/text", f"data.data_dir={data}", "data.max_length=32",
        "method=quant", "method.bits=2", "method.lr=1e-3",
    )  # fmt: skip
    metrics = train(cfg)
    assert "val/perplexity" in metrics
    run_dir = Path(cfg.paths.output_dir)
    trained = load_checkpoint_model(run_dir / "checkpoints" / "last.ckpt")
    layers = dict(quant_layers(trained))
    assert layers["lm_head"].quantizer is layers["model.embed_tokens"].quantizer
    summary = _check_export(run_dir, lambda m: {"input_ids": torch.tensor([[101, 1996, 4937, 2938, 2006, 102]])})
    assert summary["quantized_modules"] == 15  # the tied weight counted once
    assert summary["compression_rate"] > 15  # almost every weight at 2 bits


def test_config_errors(tmp_path):
    for bad in ("method.bits=1", "method.bits=9"):
        with pytest.raises(ConfigError, match=r"method\.bits=\d .*accepted: one of 2, 3, 4, 5, 6, 7, 8"):
            validate(compose_run(["method=quant", bad], tmp_path))
    with pytest.raises(ConfigError, match="method.scale_init='median'"):
        validate(compose_run(["method=quant", "method.scale_init=median"], tmp_path))
    with pytest.raises(ConfigError, match="method.contrast_temperature=0"):
        validate(compose_run(["method=quant", "method.contrast_temperature=0"], tmp_path))
    with pytest.raises(ConfigError, match="method.hard_weight=0.0.*nothing would train"):
        validate(compose_run(["method=quant", "method.distill_weight=0", "method.contrast_weight=0"], tmp_path))
    with pytest.raises(ConfigError, match="method.target_modules"):
        build("tiny", "quant", tmp_path, "method.target_modules=[no_such_layer]")
    assert FAST  # the fast settings the end-to-end runs use
