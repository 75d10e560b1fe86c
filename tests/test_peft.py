"""Shared property checks over one matrix of (tiny model x method)."""

from __future__ import annotations

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
from tests.conftest import compose_run

MODELS = ["tiny", "tiny_llama"]
METHODS = ["full_ft", "lora", "moslora", "adapter"]


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
        for n in names_trainable:
            is_adapter = any(k in n for k in ("lora_A", "lora_B", "lora_mixer", "adapter_down", "adapter_up"))
            is_head = any(n.startswith(h + ".") or f".{h}." in n for h in head)
            assert is_adapter or is_head, n
        assert any("lora_" in n or "adapter_" in n for n in names_trainable)
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
