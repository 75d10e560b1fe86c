"""Shared property checks over one matrix of (tiny model x method)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightmods.config import validate
from lightmods.data.tasks import get_task
from lightmods.errors import ConfigError
from lightmods.methods import build_method
from lightmods.models import build_backbone, build_tokenizer, family_of
from lightmods.peft import (
    AdapterLayer,
    LoraLinear,
    adapter_layers,
    count_parameters,
    inject_adapters,
    merge_adapters,
    unmerge_adapters,
)
from lightmods.peft.tensor_train import tt_parameter_count, tt_shape
from tests.conftest import compose_run

MODELS = ["tiny", "tiny_llama"]
METHODS = ["full_ft", "lora", "moslora", "adapter", "loretta_rep", "loretta_adp", "s2ft"]


def build(model: str, method: str, tmp_path, *overrides: str):
    rc = validate(compose_run([f"model={model}", f"method={method}", *overrides], tmp_path))
    torch.manual_seed(0)
    task = get_task(rc.data.task)
    tok = build_tokenizer(rc.model)
    net = build_backbone(rc.model, task, tok)
    m = build_method(rc.method)
    net = m.prepare(net, family_of(net))
    batch = tok(["the movie was great .", "the food was not good at all ."], padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None) if rc.model.arch.get("model_type") == "llama" else None
    return net, m, dict(batch)


@pytest.fixture(params=[(mo, me) for mo in MODELS for me in METHODS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path):
    model, method = request.param
    net, m, batch = build(model, method, tmp_path)
    return model, method, net, m, batch


def test_only_intended_parameters_train_and_change(case):
    model, method, net, m, batch = case
    names_trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    if method == "full_ft":
        assert len(names_trainable) == len(list(net.parameters()))
    else:
        head = m.family.head_modules
        adapter_ids = {id(p) for _, layer in adapter_layers(net) for p in layer.adapter_parameters()}
        for n, p in net.named_parameters():
            if p.requires_grad:
                is_head = any(n.startswith(h + ".") or f".{h}." in n for h in head)
                assert id(p) in adapter_ids or is_head, n
            if id(p) in adapter_ids:
                assert p.requires_grad, n
        assert adapter_ids
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: LoRA's A only gets a gradient once B is non-zero
        net(**batch).logits.sum().backward()
        opt.step()
        opt.zero_grad()
    for n, p in net.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if not p.requires_grad:
            assert not changed, f"frozen {n} changed"
    changed_trainable = [n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed_trainable, "no trainable parameter changed"


def test_adapters_start_as_identity(case, tmp_path):
    model, method, net, m, batch = case
    if method == "full_ft":
        pytest.skip("no adapters")
    net.eval()
    with torch.no_grad():
        out = net(**batch).logits
        for _, layer in adapter_layers(net):  # disable every adapter: the base model's output
            layer.merged = True
        base = net(**batch).logits
        for _, layer in adapter_layers(net):
            layer.merged = False
    torch.testing.assert_close(out, base)


def test_merge_matches_unmerged_and_unmerge_restores(case):
    model, method, net, m, batch = case
    layers = [layer for _, layer in adapter_layers(net)]
    if not layers:
        pytest.skip("no adapters")
    if not layers[0].mergeable:
        with pytest.raises(NotImplementedError):
            layers[0].merge()
        return
    with torch.no_grad():  # make the adapters non-trivial first
        for lay in layers:
            for p in lay.adapter_parameters():
                p.normal_(0, 0.2)
    net.eval()
    weights = {n: lay.base_layer.weight.clone() for n, lay in adapter_layers(net)}
    with torch.no_grad():
        unmerged = net(**batch).logits
        assert merge_adapters(net) == len(layers)
        merged = net(**batch).logits
        unmerge_adapters(net)
        again = net(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-6, rtol=1e-6)
    for n, lay in adapter_layers(net):
        torch.testing.assert_close(lay.base_layer.weight, weights[n], atol=1e-7, rtol=0)


def test_state_dict_round_trip(case, tmp_path):
    model, method, net, m, batch = case
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    net.eval()
    path = tmp_path / "sd.pt"
    torch.save(net.state_dict(), path)
    net2, _, _ = build(model, method, tmp_path / "b")
    net2.load_state_dict(torch.load(path, weights_only=True))
    net2.eval()
    with torch.no_grad():
        torch.testing.assert_close(net2(**batch).logits, net(**batch).logits)


def test_parameter_accounting(case):
    model, method, net, m, batch = case
    acc = m.summary(net)
    assert acc["params_total"] == sum(p.numel() for p in net.parameters())
    assert acc["params_trainable"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    roles = acc["params_by_role"]
    if method == "lora":
        expected = sum(layer.rank * (layer.in_features + layer.out_features) for _, layer in adapter_layers(net))
        assert roles["adapter"]["trainable"] == expected > 0
        assert roles["backbone"]["trainable"] == 0
    if method == "moslora":  # LoRA's (d_in + d_out) r plus the r x r mixer per layer
        expected = sum(layer.rank * (layer.in_features + layer.out_features + layer.rank) for _, layer in adapter_layers(net))
        assert roles["adapter"]["trainable"] == expected > 0
    if method == "adapter":
        expected = sum(2 * layer.bottleneck_dim * layer.out_features + layer.bottleneck_dim + layer.out_features for _, layer in adapter_layers(net))
        assert roles["adapter"]["trainable"] == expected > 0
    if method == "loretta_rep":  # two bias-free trains per layer, shapes (d_in, r) and (d_out, r)
        expected = sum(
            tt_parameter_count(tt_shape(layer.in_features, layer.rank), layer.tensor_rank)
            + tt_parameter_count(tt_shape(layer.out_features, layer.rank), layer.tensor_rank)
            for _, layer in adapter_layers(net)
        )
        assert roles["adapter"]["trainable"] == expected > 0
        assert roles["backbone"]["trainable"] == 0
    if method == "loretta_adp":  # two trains of shape (d, b) per layer, plus the biases (b and d)
        expected = 0
        for _, layer in adapter_layers(net):
            d = layer.out_features if layer.position == "output" else layer.in_features
            expected += 2 * tt_parameter_count(tt_shape(d, layer.bottleneck_dim), layer.tensor_rank) + layer.bottleneck_dim + d
        assert roles["adapter"]["trainable"] == expected > 0
        assert roles["backbone"]["trainable"] == 0
    if method == "s2ft":  # one dense slice per projection: rows of v/up x d_in, d_out x columns of o/down
        expected = sum(layer.size * (layer.in_features if layer.axis == "out" else layer.out_features) for _, layer in adapter_layers(net))
        assert roles["adapter"]["trainable"] == expected == acc["s2ft"]["delta_params"] > 0
        assert roles["backbone"]["trainable"] == 0


def test_lora_targets_family_defaults(tmp_path):
    net, m, _ = build("tiny", "lora", tmp_path)
    assert sorted({n.split(".")[-1] for n, _ in adapter_layers(net)}) == ["query", "value"]
    net, m, _ = build("tiny_llama", "lora", tmp_path / "l")
    assert sorted({n.split(".")[-1] for n, _ in adapter_layers(net)}) == ["q_proj", "v_proj"]


def test_lora_target_patterns_and_regex(tmp_path):
    net, m, _ = build("tiny", "lora", tmp_path, "method.target_modules=[key,'re:.*layer\\.1\\.output\\.dense']")
    names = [n for n, _ in adapter_layers(net)]
    assert sum(n.endswith(".key") for n in names) == 2
    assert [n for n in names if n.endswith("output.dense")] == ["bert.encoder.layer.1.output.dense"]


def test_houlsby_and_pfeiffer_placements(tmp_path):
    net, _, _ = build("tiny", "adapter", tmp_path)
    assert len(list(adapter_layers(net))) == 4  # attention output + FFN output, 2 layers
    net, _, _ = build("tiny", "adapter", tmp_path / "p", "method.variant=pfeiffer")
    names = [n for n, _ in adapter_layers(net)]
    assert len(names) == 2 and all("attention" not in n for n in names)


def test_patterns_matching_nothing_fail_with_the_names_that_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"method.target_modules=\['qkv'\].*query"):
        build("tiny", "lora", tmp_path, "method.target_modules=[qkv]")


def test_lora_layer_math():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoraLinear(base, rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    expected = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    assert isinstance(layer, AdapterLayer) and layer.weight is base.weight


def test_injection_keeps_the_base_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    first = model[0]
    names = inject_adapters(model, ["0"], lambda lin: LoraLinear(lin, rank=1))
    assert names == ["0"] and model[0].base_layer is first
    assert count_parameters(model)["params_by_role"]["adapter"]["total"] == 8


def test_moslora_with_identity_mixer_is_lora_and_orthogonal_init_is_orthogonal():
    from lightmods.peft import MoSLoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    mos = MoSLoraLinear(base, rank=3, alpha=6, mixer_init="orthogonal")
    m = mos.lora_mixer.weight
    torch.testing.assert_close(m @ m.T, torch.eye(3), atol=1e-5, rtol=0)
    lora = LoraLinear(base, rank=3, alpha=6)
    with torch.no_grad():
        lora.lora_A.weight.copy_(mos.lora_A.weight)
        mos.lora_B.weight.normal_()
        lora.lora_B.weight.copy_(mos.lora_B.weight)
        mos.lora_mixer.weight.copy_(torch.eye(3))
    x = torch.randn(4, 6)
    torch.testing.assert_close(mos(x), lora(x))
    with torch.no_grad():
        mos.lora_mixer.weight.normal_()
    assert not torch.allclose(mos(x), lora(x))  # a non-identity mixer mixes the subspaces


# LoRETTA: tensor-train shapes, parameter counts and layers.

OFFICIAL_SHAPES = {  # the notes' table of the official code's shapes (hidden d, bottleneck b)
    (768, 64): (8, 8, 12, 8, 8), (1024, 64): (4, 8, 8, 8, 8, 4), (4096, 64): (16, 16, 16, 4, 4, 4),
    (768, 8): (8, 8, 12, 8), (1024, 8): (4, 8, 8, 8, 4), (4096, 8): (16, 16, 8, 4, 4),
}  # fmt: skip


def test_tt_shapes_reproduce_the_official_table_and_factor_every_size():
    from lightmods.peft.tensor_train import OFFICIAL_TT_SHAPES, factorize

    for (d, b), shape in OFFICIAL_SHAPES.items():
        assert tt_shape(d, b) == shape
    for b, table in OFFICIAL_TT_SHAPES.items():
        for d, shape in table.items():
            assert math.prod(shape) == d * b
    for d in (32, 64, 100, 384, 768, 1000, 2048, 3072, 11008):
        for b in (1, 4, 5, 8, 16, 32, 64):
            shape = tt_shape(d, b)
            assert math.prod(shape) == d * b and len(shape) >= 2, (d, b, shape)
            if all(p <= 16 for p in factorize(d * b, max_factor=10**9)):  # no prime above 16: every mode fits
                assert max(shape) <= 16, (d, b, shape)
    assert tt_shape(1024, 32) != (4, 8, 16, 8, 4) and math.prod(tt_shape(1024, 32)) == 1024 * 32  # the table's bad entry
    assert factorize(7) == (7,) and factorize(6144) == (12, 8, 8, 8)


def test_tt_linear_parameter_count_and_contraction():
    from lightmods.peft import TTLinear

    torch.manual_seed(0)
    shape, rank = (4, 3, 5, 2), 3
    layer = TTLinear(12, 10, shape, rank, bias=True)
    assert sum(p.numel() for p in layer.parameters()) == (1 * 4 * 3 + 3 * 3 * 3 + 3 * 5 * 3 + 3 * 2 * 1) + 10
    assert tt_parameter_count(shape, rank) == 1 * 4 * 3 + 3 * 3 * 3 + 3 * 5 * 3 + 3 * 2 * 1
    # entry (i1..i4) of the tensor is the product of the core slices G_k[:, i_k, :]
    full = torch.empty(shape)
    for idx in itertools.product(*(range(n) for n in shape)):
        m = torch.eye(1)
        for k, i in enumerate(idx):
            m = m @ layer.cores[k][:, i, :]
        full[idx] = m.squeeze()
    w = full.reshape(12, 10)
    x = torch.randn(7, 12)
    torch.testing.assert_close(layer(x), x @ w + layer.bias)
    torch.testing.assert_close(layer.dense_weight(), w.T)
    with pytest.raises(ValueError, match="not 12 \\* 11"):
        TTLinear(12, 11, shape, rank)


def test_tt_official_init_has_the_target_spread_and_zero_init_is_zero():
    from lightmods.peft import TTLinear

    torch.manual_seed(0)
    layer = TTLinear(768, 64, tt_shape(768, 64), 5, init="gaussian")
    stds = []
    for _ in range(8):  # the spread of one draw varies with the shared cores; average a few draws
        layer.reset_parameters("gaussian")
        stds.append(layer.full_weight().std().item())
    assert abs(sum(stds) / len(stds) / math.sqrt(1 / (768 + 64)) - 1) < 0.25
    zero = TTLinear(768, 64, tt_shape(768, 64), 5, init="zero")
    assert torch.count_nonzero(zero.full_weight()) == 0 and torch.count_nonzero(zero.bias) == 0
    assert all(torch.count_nonzero(c) > 0 for c in zero.cores[:-1])


def test_loretta_rep_layer_math_and_inits():
    from lightmods.peft import LorettaRepLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32)
    x = torch.randn(3, 64)
    zero = LorettaRepLinear(base, rank=8, alpha=16, tensor_rank=4)
    torch.testing.assert_close(zero(x), base(x))  # B's last core is zero: the base layer exactly
    layer = LorettaRepLinear(base, rank=8, alpha=16, tensor_rank=4, init="gaussian")
    assert layer.delta_weight().abs().max() > 0  # the official init: a small non-zero update
    a, b = layer.lora_A.dense_weight(), layer.lora_B.dense_weight()
    assert a.shape == (8, 64) and b.shape == (32, 8)
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ a.T @ b.T)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * b @ a)
    assert sum(p.numel() for p in layer.adapter_parameters()) == tt_parameter_count(tt_shape(64, 8), 4) + tt_parameter_count(tt_shape(32, 8), 4)


@pytest.mark.parametrize("position", ["output", "input"])
def test_loretta_adapter_layer_math(position):
    from lightmods.peft import LorettaAdapter

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 32)
    x = torch.randn(3, 48)
    assert torch.equal(LorettaAdapter(base, bottleneck_dim=8, position=position)(x), base(x))
    layer = LorettaAdapter(base, bottleneck_dim=8, tensor_rank=3, scaling=0.5, position=position, init="gaussian")

    def adapt(z):
        down, up = layer.adapter_down, layer.adapter_up
        return z + 0.5 * (torch.relu(z @ down.full_weight() + down.bias) @ up.full_weight() + up.bias)

    expected = adapt(base(x)) if position == "output" else base(adapt(x))
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer(x), base(x))
    d = 32 if position == "output" else 48
    assert sum(p.numel() for p in layer.adapter_parameters()) == 2 * tt_parameter_count(tt_shape(d, 8), 3) + 8 + d


def test_loretta_placements_follow_the_official_code(tmp_path):
    net, _, _ = build("tiny", "loretta_rep", tmp_path)
    assert sorted({n.split(".")[-1] for n, _ in adapter_layers(net)}) == ["query", "value"]
    net, _, _ = build("tiny", "loretta_adp", tmp_path / "a")
    layers = dict(adapter_layers(net))
    assert len(layers) == 4 and all(n.endswith("output.dense") and lay.position == "output" for n, lay in layers.items())
    net, _, _ = build("tiny_llama", "loretta_adp", tmp_path / "l")
    positions = {n.split(".")[-1]: lay.position for n, lay in adapter_layers(net)}
    assert positions == {"gate_proj": "input", "up_proj": "input", "down_proj": "output"}
    net, _, _ = build("tiny_llama", "loretta_adp", tmp_path / "o", "method.target_modules=[o_proj]", "method.input_target_modules=[]")
    assert sorted({n.split(".")[-1] for n, _ in adapter_layers(net)}) == ["o_proj"]


def test_loretta_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="method.tensor_rank=0"):
        build("tiny", "loretta_rep", tmp_path, "method.tensor_rank=0")
    with pytest.raises(ConfigError, match="method.init='ones'.*'zero', 'gaussian'"):
        build("tiny", "loretta_adp", tmp_path, "method.init=ones")
