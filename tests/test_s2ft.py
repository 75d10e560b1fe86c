"""S2FT: co-permutation invariance, exact fusion, partial back-propagation against autograd, selection
counts and determinism, config errors, export as a plain transformers model, and a run through train()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from lightmods.errors import ConfigError
from lightmods.export import export_kind, export_model, load_export
from lightmods.methods.s2ft import co_order, selection_count
from lightmods.peft import adapter_layers, merge_adapters, unmerge_adapters
from lightmods.peft.s2 import S2Linear, S2LinearFunction
from lightmods.structure import blocks
from tests.test_peft import build

MODELS = ["tiny", "tiny_llama"]
ALL_PARTS = ("method.v_ratio=0.5", "method.o_ratio=0.5", "method.u_ratio=0.3", "method.d_ratio=0.3")


def _logits(net, batch):
    net.eval()
    with torch.no_grad():
        return net(**batch).logits


def _plain(model: str, tmp_path):
    """The backbone ``build`` starts from, before the method touches it (same seed, so same weights)."""
    net, _, batch = build(model, "full_ft", tmp_path)
    return net, batch


@pytest.mark.parametrize("model", MODELS)
def test_co_permutation_leaves_the_function_unchanged(tmp_path, model):
    plain, batch = _plain(model, tmp_path / "p")
    net, m, _ = build(model, "s2ft", tmp_path / "s", *ALL_PARTS)
    assert any(order != sorted(order) for order in m.plan.heads.values())  # really reordered
    assert any(order != sorted(order) for order in m.plan.neurons.values())
    blk, ref = blocks(net)[0], blocks(plain)[0]
    assert not torch.equal(blk.linear(blk.layout.ffn_out).weight, ref.linear(ref.layout.ffn_out).weight)
    torch.testing.assert_close(_logits(net, batch), _logits(plain, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_fused_equals_unfused_and_unfuse_restores(tmp_path, model):
    net, _, batch = build(model, "s2ft", tmp_path, *ALL_PARTS)
    layers = dict(adapter_layers(net))
    assert {lay.axis for lay in layers.values()} == {"in", "out"}
    with torch.no_grad():
        for lay in layers.values():
            lay.s2_delta.normal_(0, 0.2)
    base = {n: lay.base_layer.weight.clone() for n, lay in layers.items()}
    unfused = _logits(net, batch)
    merge_adapters(net)
    for n, lay in layers.items():  # only the slice changed, by exactly the delta
        diff = lay.base_layer.weight - base[n]
        region = diff[lay.start : lay.end] if lay.axis == "out" else diff[:, lay.start : lay.end]
        torch.testing.assert_close(region, lay.s2_delta, atol=1e-6, rtol=0)
        assert diff.abs().sum() == pytest.approx(region.abs().sum().item(), rel=1e-6)
    torch.testing.assert_close(_logits(net, batch), unfused, atol=1e-5, rtol=1e-5)
    unmerge_adapters(net)
    for n, lay in layers.items():
        torch.testing.assert_close(lay.base_layer.weight, base[n], atol=1e-7, rtol=0)


@pytest.mark.parametrize("axis", ["in", "out"])
@pytest.mark.parametrize("trainable_base", [False, True])
def test_partial_backprop_function_passes_gradcheck(axis, trainable_base):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=trainable_base)
    b = torch.randn(5, dtype=torch.float64, requires_grad=trainable_base)
    start, end = (2, 6) if axis == "in" else (1, 4)
    delta = torch.randn(
        (5, end - start) if axis == "in" else (end - start, 7), dtype=torch.float64, requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda *a: S2LinearFunction.apply(*a, start, end, axis), (x, w, b, delta))


@pytest.mark.parametrize("axis", ["in", "out"])
def test_delta_gradient_is_the_slice_of_the_full_weight_gradient(axis):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    full = torch.nn.Linear(12, 10)
    full.load_state_dict(base.state_dict())
    start, end = (3, 8) if axis == "in" else (2, 6)
    layer = S2Linear(base, start, end, axis)
    base.requires_grad_(False)
    with torch.no_grad():
        layer.s2_delta.normal_()  # the full layer holds the same effective weight
        full.weight.add_(layer.delta_weight())
    x1, x2 = torch.randn(4, 3, 12, requires_grad=True), torch.randn(4, 3, 12, requires_grad=True)
    with torch.no_grad():
        x2.copy_(x1)
    target = torch.randn(4, 3, 10)
    ((layer(x1) - target) ** 2).sum().backward()
    ((full(x2) - target) ** 2).sum().backward()
    expected = full.weight.grad[start:end] if axis == "out" else full.weight.grad[:, start:end]
    torch.testing.assert_close(layer.s2_delta.grad, expected)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert base.weight.grad is None


@pytest.mark.parametrize("model", MODELS)
def test_partial_backprop_matches_plain_autograd_in_a_model(tmp_path, model):
    nets = []
    for partial in ("true", "false"):
        net, _, batch = build(
            model, "s2ft", tmp_path / partial, *ALL_PARTS, f"method.partial_backprop={partial}"
        )
        with torch.no_grad():
            torch.manual_seed(1)
            for _, lay in sorted(adapter_layers(net)):
                lay.s2_delta.normal_(0, 0.1)
        net.train()
        net(**batch).logits.square().sum().backward()
        nets.append(net)
    grads = [{n: p.grad for n, p in net.named_parameters() if p.requires_grad} for net in nets]
    assert grads[0].keys() == grads[1].keys() and any("s2_delta" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward (a view keeps its whole storage alive)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def test_column_slice_saves_only_its_input_slice():
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 64).requires_grad_(False)
    x = torch.randn(8, 16, 256, requires_grad=True)
    partial = S2Linear(base, 0, 16, "in")
    plain = S2Linear(base, 0, 16, "in", partial_backprop=False)
    weight_storage = base.weight.untyped_storage().data_ptr()
    kept_partial = {k: v for k, v in _saved_bytes(lambda: partial(x)).items() if k != weight_storage}
    kept_plain = {k: v for k, v in _saved_bytes(lambda: plain(x)).items() if k != weight_storage}
    assert sum(kept_partial.values()) <= 8 * 16 * 16 * 4 + partial.s2_delta.numel() * 4
    assert sum(kept_plain.values()) >= x.numel() * 4  # the sliced view keeps all of x alive


@pytest.mark.parametrize("model", MODELS)
def test_selection_counts_slices_and_coupling(tmp_path, model):
    ratios = {"v": 0.5, "o": 0.5, "u": 0.3, "d": 0.3}
    net, m, _ = build(model, "s2ft", tmp_path, *ALL_PARTS)
    s = m.summary(net)["s2ft"]
    units, channels = s["attention_units_total"], s["ffn_channels_total"]
    for p, r in ratios.items():
        total = units if p in "vo" else channels
        assert s[f"{p}_selected"] == selection_count(r, total) == sum(s[f"{p}_per_layer"])
    blk0 = blocks(net)[0]
    kv, q = blk0.head_dim, blk0.head_dim * blk0.group
    for blk in blocks(net):
        i, lay = blk.index, blk.layout
        for part, rel, width, attn in (
            ("v", lay.value, kv, True),
            ("o", lay.attn_out, q, True),
            ("u", lay.ffn_in[-1], 1, False),
            ("d", lay.ffn_out, 1, False),
        ):
            chosen = m.selected[part][i]
            module = blk.linear(rel)
            if not chosen:
                assert not isinstance(module, S2Linear) or module.size == 0
                continue
            assert isinstance(module, S2Linear) and module.size == len(chosen) * width
            order = (m.plan.heads if attn else m.plan.neurons)[i]
            assert (
                sorted(order[module.start // width : module.end // width]) == chosen
            )  # the slice is the selection
            assert module.axis == ("out" if part in "vu" else "in")


def test_co_order():
    order, first, second = co_order([4, 1, 2], [2, 5], 7)
    assert order == [1, 4, 2, 5, 0, 3, 6] and first == (0, 3) and second == (2, 4)
    assert co_order([], [3], 4) == ([3, 0, 1, 2], (0, 0), (0, 1))
    assert selection_count(0.0, 10) == 0 and selection_count(0.01, 10) == 1 and selection_count(0.26, 10) == 3


def test_selection_is_deterministic_per_seed(tmp_path):
    picks = []
    for i, seed in enumerate((0, 0, 7)):
        torch.manual_seed(100 + i)  # the global RNG must not matter
        _, m, _ = build("tiny", "s2ft", tmp_path / str(i), *ALL_PARTS, f"method.seed={seed}")
        picks.append(m.selected)
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_weight_norm_selection_picks_the_largest_norms(tmp_path):
    plain, _ = _plain("tiny", tmp_path / "p")
    _, m, _ = build(
        "tiny",
        "s2ft",
        tmp_path / "s",
        "method.selection=weight_norm",
        "method.o_ratio=0.25",
        "method.d_ratio=0.1",
    )
    norms = torch.cat([b.linear(b.layout.ffn_out).weight.norm(dim=0) for b in blocks(plain)])
    n = blocks(plain)[0].num_neurons
    chosen = [layer * n + c for layer, cs in m.selected["d"].items() for c in cs]
    assert sorted(chosen) == sorted(torch.topk(norms, len(chosen)).indices.tolist())
    heads = torch.stack(
        [b.linear(b.layout.attn_out).weight.reshape(32, 4, 8).norm(dim=(0, 2)) for b in blocks(plain)]
    ).flatten()
    chosen = [layer * 4 + u for layer, us in m.selected["o"].items() for u in us]
    assert sorted(chosen) == sorted(torch.topk(heads, 2).indices.tolist())


@pytest.mark.parametrize(
    "override,match",
    [
        ("method.o_ratio=1.5", r"method.o_ratio=1.5 is not accepted; accepted: a number in \[0, 1\]"),
        ("method.selection=gradient", r"method.selection='gradient'.*'random', 'weight_norm'"),
    ],
)
def test_config_errors(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        build("tiny", "s2ft", tmp_path, override)
    with pytest.raises(ConfigError, match="method.o_ratio=0.0 .*nothing would train"):
        build("tiny", "s2ft", tmp_path, "method.o_ratio=0", "method.d_ratio=0")


@pytest.mark.parametrize("model", MODELS)
def test_trained_s2ft_exports_as_a_plain_transformers_model(tmp_path, model):
    from transformers import AutoModelForSequenceClassification

    net, m, batch = build(model, "s2ft", tmp_path, *ALL_PARTS)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    for _ in range(2):
        net(**batch).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(lay.s2_delta.abs().max() > 0 for _, lay in adapter_layers(net))
    expected = _logits(net, batch)
    assert export_kind(net, "s2ft") == "transformers"
    out = export_model(net, tmp_path / "export", {"note": "unit test"}, m.family.head_modules, "s2ft")
    assert json.loads((out / "lightmods.json").read_text())["kind"] == "transformers"
    with torch.no_grad():
        torch.testing.assert_close(load_export(out)(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert not any("s2_delta" in k for k in plain.state_dict())


def test_train_run_reports_the_s2ft_breakdown(run_cfg):
    from lightmods.run import train

    cfg = run_cfg("model=tiny_llama", "method=s2ft", "method.v_ratio=0.5", "trainer.fast_dev_run=2")
    train(cfg)
    s = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert s["status"] == "completed" and s["method"] == "s2ft"
    assert s["params_by_role"]["adapter"]["trainable"] == s["s2ft"]["delta_params"] > 0
    assert s["s2ft"]["v_selected"] == 2 and s["s2ft"]["query_heads_per_unit"] == 2


@pytest.mark.parametrize("axis", ["in", "out"])
def test_autocast_backward_keeps_parameter_dtypes(axis):
    torch.manual_seed(0)
    layer = S2Linear(torch.nn.Linear(16, 12).requires_grad_(False), 4, 8, axis)
    with torch.no_grad():
        layer.s2_delta.normal_()
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.s2_delta.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = S2Linear(layer.base_layer, 4, 8, axis, partial_backprop=False)
    with torch.no_grad():
        ref.s2_delta.copy_(layer.s2_delta)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(layer.s2_delta.grad, ref.s2_delta.grad, atol=0.1, rtol=0.02)
    torch.testing.assert_close(x.grad, x2.grad, atol=0.1, rtol=0.02)


def test_s2_layer_follows_structural_pruning():
    torch.manual_seed(0)
    layer = S2Linear(torch.nn.Linear(12, 10), 3, 8, "in")
    with torch.no_grad():
        layer.s2_delta.normal_()
    x = torch.randn(4, 12)
    keep = torch.tensor([0, 3, 4, 5, 6, 7, 9])
    masked = x.clone()
    masked[:, [1, 2, 8, 10, 11]] = 0
    expected = layer(masked)
    layer.select_features(out_index=torch.tensor([9, 0, 4]), in_index=keep)
    assert (layer.start, layer.end) == (1, 6) and layer.s2_delta.shape == (3, 5)
    torch.testing.assert_close(layer(x[:, keep]), expected[:, [9, 0, 4]])
    with pytest.raises(NotImplementedError, match="non-contiguous"):
        layer.select_features(in_index=torch.tensor([1, 0, 2, 3, 4, 5, 6]))
