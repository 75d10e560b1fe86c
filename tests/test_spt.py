"""SPT: dense settings equal the plain model; the attended keys are the top-k of the PQ estimates; sparse
attention and the routed FFN equal dense references restricted to what was selected; gradients reach LoRA
and the router; training, export/reload and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightmods.errors import ConfigError
from lightmods.export import export_model, load_export
from lightmods.peft import LoraLinear, adapter_layers
from lightmods.spt import attention as spt_attention
from lightmods.spt.attention import (
    SparseAttentionState,
    allowed_keys,
    estimated_scores,
    select_keys,
    sparse_attention,
)
from lightmods.spt.ffn import (
    BlockRouter,
    RoutedGatedMLP,
    RoutedIntermediate,
    routed_activations,
    routed_output,
)
from lightmods.spt.measure import saved_activation_bytes
from lightmods.spt.quantizer import ProductQuantizer
from tests.test_peft import build

MODELS = ["tiny", "tiny_llama"]
SMALL = ("method.codeword_dim=4", "method.compare_steps=0")  # tiny heads are 8 wide: 2 subspaces
DENSE = ("method.key_fraction=1", "method.active_blocks=4", *SMALL)


def _logits(net, batch):
    net.eval()
    with torch.no_grad():
        return net(**batch).logits


def _randomize_lora(net, std=0.3):
    with torch.no_grad():
        for _, layer in adapter_layers(net):
            layer.lora_B.weight.normal_(0, std)


@pytest.mark.parametrize("model", MODELS)
def test_dense_settings_equal_the_plain_model(tmp_path, model):
    plain, _, batch = build(model, "full_ft", tmp_path / "p")
    expected = _logits(plain, batch)
    st, _, _ = build(model, "spt", tmp_path / "st", *DENSE, "method.router_gate=straight_through")
    assert st.config._attn_implementation == "lightmods_spt"
    assert sum(isinstance(m, SparseAttentionState) for m in st.modules()) == 2
    assert sum(isinstance(m, (RoutedIntermediate, RoutedGatedMLP)) for m in st.modules()) == 2
    torch.testing.assert_close(_logits(st, batch), expected, atol=1e-5, rtol=1e-5)
    sig, _, _ = build(model, "spt", tmp_path / "sig", *DENSE)  # the paper's 2*sigmoid gate: 1 at logit 0
    with torch.no_grad():
        for r in (m for m in sig.modules() if isinstance(m, BlockRouter)):
            r.proj.weight.zero_()
    torch.testing.assert_close(_logits(sig, batch), expected, atol=1e-5, rtol=1e-5)
    sparse, _, _ = build(model, "spt", tmp_path / "sp", "method.key_fraction=0.3", *SMALL)
    assert (_logits(sparse, batch) - expected).abs().max() > 1e-4  # the sparsity really acts


def _trained_pq(x: torch.Tensor, steps: int = 5) -> ProductQuantizer:
    pq = ProductQuantizer(x.shape[-1], codeword_dim=4, codebook_size=8, decay=0.5)
    for _ in range(steps):
        pq.update(x)
    return pq


def test_online_kmeans_lowers_quantisation_error():
    torch.manual_seed(0)
    centers = torch.randn(8, 16) * 3
    x = centers[torch.randint(0, 8, (512,))] + 0.1 * torch.randn(512, 16)
    pq = ProductQuantizer(16, codeword_dim=4, codebook_size=8, decay=0.5)
    pq.update(x[:1])
    pq.codebook.normal_()  # a bad start
    err0 = (pq.decode(pq.encode(x)) - x).square().mean()
    for _ in range(20):
        pq.update(x)
    err = (pq.decode(pq.encode(x)) - x).square().mean()
    assert err < 0.2 * err0
    assert pq.encode(x).shape == (512, 4) and pq.decode(pq.encode(x)).shape == x.shape


@pytest.mark.parametrize("causal", [False, True])
def test_selected_keys_are_the_top_k_of_the_pq_estimates(causal):
    torch.manual_seed(0)
    B, H, L, D, k = 2, 3, 20, 8, 5
    q, key = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    pq = _trained_pq(torch.cat([q, key]).reshape(-1, D))
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, 14:] = False  # the second row is padded
    mask = pad[:, None, None, :].expand(B, 1, L, L)
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool).tril()
    additive = torch.zeros(B, 1, L, L).masked_fill(~mask, torch.finfo(torch.float32).min)
    allowed = allowed_keys(additive, L, L, causal, q.device)
    assert torch.equal(allowed, mask)
    idx, valid = select_keys(q, key, pq, k, allowed)
    est = estimated_scores(pq.decode(pq.encode(q)), pq.decode(pq.encode(key)), allowed)  # the reference
    for b in range(B):
        for h in range(H):
            for i in range(L):
                row, chosen = est[b, h, i], idx[b, h, i]
                n_allowed = int(allowed[b, 0, i].sum())
                assert int(valid[b, h, i].sum()) == min(k, n_allowed)
                kth = row.sort(descending=True).values[k - 1]
                assert (row[chosen] >= kth).all()  # every chosen key is in the top k (ties at the k-th allowed)
                assert set(torch.nonzero(row > kth).flatten().tolist()) <= set(chosen.tolist())
                assert len(set(chosen.tolist())) == k
                assert allowed[b, 0, i, chosen[valid[b, h, i]]].all()


def _dense_reference(q, k, v, idx, valid, scaling):
    keep = torch.zeros(*q.shape[:-1], k.shape[-2], dtype=torch.bool)
    keep.scatter_(-1, idx, valid if valid is not None else torch.ones_like(idx, dtype=torch.bool))
    s = (q @ k.transpose(-1, -2) * scaling).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def test_sparse_attention_equals_dense_attention_on_the_selected_keys():
    torch.manual_seed(0)
    B, H, L, D, k = 2, 2, 12, 8, 4
    q, key, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    idx = torch.stack([torch.randperm(L)[:k] for _ in range(B * H * L)]).view(B, H, L, k)
    valid = torch.rand(B, H, L, k) > 0.2
    valid[..., 0] = True
    out = sparse_attention(q, key, v, idx, valid, 0.35)
    ref = _dense_reference(q, key, v, idx, valid, 0.35)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, key, v), g)
    ref_grads = torch.autograd.grad(ref, (q, key, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    small = [t[:1, :1, :6, :4].detach().clone().requires_grad_(True) for t in (q, key, v)]
    sidx = torch.stack([torch.randperm(6)[:3] for _ in range(6)]).view(1, 1, 6, 3)
    fn = lambda a, b, c: sparse_attention(a, b, c, sidx, None, 0.35)  # noqa: E731
    assert torch.autograd.gradcheck(fn, small)


def test_sparse_attention_saves_memory_in_proportion_to_the_kept_keys():
    torch.manual_seed(0)
    B, H, L, D = 2, 4, 256, 16
    q, key, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    qkv = 3 * q.numel() * 4

    def saved(k):
        idx = torch.stack([torch.randperm(L)[:k] for _ in range(B * H * L)]).view(B, H, L, k)
        return saved_activation_bytes(torch.nn.Linear(1, 1), lambda: sparse_attention(q, key, v, idx, None, 0.25))[1] - qkv

    per_key = B * H * L * (4 + 4)  # float32 probabilities + int32 indices per kept entry
    assert saved(32) == 32 * per_key and saved(128) == 128 * per_key
    dense = saved_activation_bytes(torch.nn.Linear(1, 1), lambda: torch.softmax(q @ key.transpose(-1, -2), -1) @ v)[1]
    assert saved(32) < dense / 4


@pytest.mark.parametrize("model", MODELS)
def test_routed_ffn_equals_the_dense_ffn_restricted_to_the_chosen_blocks(tmp_path, model):
    ffn = ["intermediate.dense", "output.dense"] if model == "tiny" else ["gate_proj", "up_proj", "down_proj"]
    net, _, _ = build(model, "spt", tmp_path, *SMALL, f"method.target_modules=[{','.join(ffn)}]", "method.router_init_std=0.5")
    _randomize_lora(net)
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    if model == "tiny":
        layer = net.bert.encoder.layer[0]
        inter, down = layer.intermediate, layer.output.dense
        ins, combine, router = [inter.dense], lambda pre: inter.intermediate_act_fn(pre[0]), inter.spt_router
    else:
        mlp = net.model.layers[0].mlp
        ins, down, router = [mlp.gate_proj, mlp.up_proj], mlp.down_proj, mlp.spt_router
        combine = lambda pre: mlp.act_fn(pre[0]) * pre[1]  # noqa: E731
    assert all(isinstance(m, LoraLinear) for m in (*ins, down))
    with torch.no_grad():
        y = routed_output(routed_activations(x, router, ins, combine), down)
        idx, scale = router(x.reshape(-1, 32))
        h = combine([lin(x.reshape(-1, 32)) for lin in ins])  # the dense FFN's activations [T, 64]
        block = 64 // router.n_blocks
        weight = torch.zeros_like(h)
        for slot in range(router.active):
            for t in range(h.shape[0]):
                b = int(idx[t, slot])
                weight[t, b * block : (b + 1) * block] = scale[t, slot]
        ref = down(h * weight).reshape(2, 7, 32)
    assert (weight == 0).float().mean() == pytest.approx(0.5)  # half of every token's neurons are off
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert (y - down(h).reshape(2, 7, 32)).abs().max() > 1e-3


@pytest.mark.parametrize("model", MODELS)
def test_gradients_reach_lora_and_the_router_and_codebooks_learn(tmp_path, model):
    net, _, batch = build(model, "spt", tmp_path, "method.key_fraction=0.5", *SMALL)
    _randomize_lora(net, 0.05)
    before = {k: v.clone() for k, v in net.state_dict().items() if "codebook" in k}
    net.train()
    net(**batch).logits.square().sum().backward()
    named = dict(net.named_parameters())
    lora = [n for n in named if ".lora_" in n]
    routers = [n for n in named if "spt_router" in n and n.endswith("weight")]
    assert lora and len(routers) == 2
    for n in lora + routers:
        assert named[n].requires_grad and named[n].grad is not None and named[n].grad.abs().sum() > 0, n
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert all(".lora_" in n or "spt_router" in n or n.startswith(("classifier", "score", "bert.pooler")) for n in trainable)
    after = {k: v for k, v in net.state_dict().items() if "codebook" in k}
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)


def test_the_model_attends_to_the_top_k_of_its_pq_estimates(tmp_path, monkeypatch):
    net, _, batch = build("tiny_llama", "spt", tmp_path, "method.key_fraction=0.4", *SMALL)
    calls = []
    real = spt_attention.select_keys

    def spy(query, key, pq, k, allowed):
        idx, valid = real(query, key, pq, k, allowed)
        calls.append((query, key, pq, k, allowed, idx, valid))
        return idx, valid

    monkeypatch.setattr(spt_attention, "select_keys", spy)
    _logits(net, batch)
    assert len(calls) == 2
    for query, key, pq, k, allowed, idx, valid in calls:
        L = query.shape[-2]
        assert k == 4 and allowed.shape[-2:] == (L, L)
        assert not allowed[0, 0].triu(1).any()  # causal
        assert not allowed[0, 0, :, -1].any()  # the first sentence is padded (pad on the right)
        est = estimated_scores(pq.decode(pq.encode(query)), pq.decode(pq.encode(key)), allowed)
        kth = est.sort(-1, descending=True).values[..., k - 1 : k]
        chosen = est.gather(-1, idx)
        assert (chosen[valid] >= kth.expand_as(chosen)[valid]).all()
        assert ((est > kth).sum(-1) <= (chosen > kth).sum(-1)).all()


def _train_steps(net, batch, labels, steps, lr=3e-2):
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(**batch).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model", MODELS)
def test_trains_end_to_end_and_export_reloads_identically(tmp_path, model):
    net, m, batch = build(model, "spt", tmp_path, *SMALL, "method.key_fraction=0.5")
    labels = torch.tensor([1, 0])
    router_before = [r.proj.weight.clone() for r in net.modules() if isinstance(r, BlockRouter)]
    losses = _train_steps(net, batch, labels, 12)
    assert losses[-1] < 0.5 * losses[0]
    assert all(not torch.equal(a, r.proj.weight) for a, r in zip(router_before, (r for r in net.modules() if isinstance(r, BlockRouter))))
    expected = _logits(net, batch)
    run_config = _plain_config(tmp_path / "cfg", f"model={model}", "method=spt", *SMALL, "method.key_fraction=0.5")
    out = export_model(net, tmp_path / "export", run_config, m.family.head_modules, "spt")
    meta = json.loads((out / "lightmods.json").read_text())
    assert meta["kind"] == "lightmods" and meta["adapters_merged"] is True
    saved = load_file(out / "model.safetensors")
    assert not any(".lora_" in k or "base_layer" in k for k in saved)
    assert any("spt_router" in k for k in saved) and any("codebook" in k for k in saved)
    reloaded = load_export(out)
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert reloaded.config._attn_implementation == "lightmods_spt"


def _plain_config(out, *overrides):
    from omegaconf import OmegaConf

    from tests.conftest import compose_run

    return OmegaConf.to_container(compose_run(list(overrides), out), resolve=True)


def test_train_run_writes_the_spt_summary(run_cfg):
    from lightmods.run import train

    cfg = run_cfg("model=tiny_llama", "method=spt", *SMALL, "method.compare_steps=1", "method.compare_length=32", "trainer.max_steps=3")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["method"] == "spt"
    spt = s["spt"]
    assert spt["sparse_attention_layers"] == 2 and spt["routed_ffn_layers"] == 2 and spt["router_params"] == 2 * (32 * 4 + 4)
    vs = spt["vs_lora"]
    assert vs["spt"]["step_time_s"] > 0 and vs["lora"]["activation_memory_mb"] > 0 and vs["step_time_ratio_lora_over_spt"] > 0
    assert json.loads((out / "export" / "lightmods.json").read_text())["adapters_merged"] is True
    assert load_export(out / "export").config._attn_implementation == "lightmods_spt"


@pytest.mark.parametrize(
    "override, match",
    [
        ("method.key_fraction=0", r"method.key_fraction=0.0 .*\(0, 1\]"),
        ("method.key_fraction=1.5", r"method.key_fraction=1.5"),
        ("method.active_blocks=5", r"method.active_blocks=5 .*\[1, method.ffn_blocks=4\]"),
        ("method.ffn_blocks=3", r"method.ffn_blocks=3 .*divisor of the FFN width 64"),
        ("method.codeword_dim=3", r"method.codeword_dim=3 .*divisor of the head size 8"),
        ("method.codebook_size=1", r"method.codebook_size=1"),
        ("method.codebook_decay=1.0", r"method.codebook_decay=1.0"),
        ("method.router_gate=softmax", r"method.router_gate='softmax'"),
        ("method.sparse_attention=false", None),
    ],
)
def test_config_errors(tmp_path, override, match):
    if match is None:  # one switch off is fine; both off is an error
        build("tiny", "spt", tmp_path, override, *SMALL)
        with pytest.raises(ConfigError, match="method.sparse_attention=False .*method.routed_ffn is false"):
            build("tiny", "spt", tmp_path, override, "method.routed_ffn=false", *SMALL)
        return
    with pytest.raises(ConfigError, match=match):
        build("tiny", "spt", tmp_path, *SMALL, override)


def test_image_models_are_refused(run_cfg):
    from lightmods.run import train

    with pytest.raises(ConfigError, match="vit"):
        train(run_cfg("model=tiny_vit", "data=images/synthetic", "method=spt"))
