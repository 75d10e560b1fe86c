"""Hidden (residual-stream) channel pruning in the structural core: exactness against the masked originals,
plan serialisation and composition, and re-application on resume and export reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lightmods.exits.flops import FlopsProfile
from lightmods.export import export_model, load_export, rebuild_model
from lightmods.peft import adapter_layers
from lightmods.structure import PruningPlan, apply_plan, blocks, hidden_width, layout_of
from lightmods.structure.kv_cache import kv_cache_bytes_per_token
from tests.conftest import compose_run

ALL_LINEARS = "method.target_modules=[query,key,value,dense,q_proj,k_proj,v_proj,o_proj,up_proj,gate_proj,down_proj]"
KEEP = [0, 3, 4, 5, 8, 9, 11, 12, 13, 17, 18, 20, 21, 22, 25, 26, 27, 28, 30, 31]  # 20 of 32 channels
IDS = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))


def prepared(model: str, method: str, tmp_path, *overrides: str):
    """The prepared model a run with these overrides trains (random init, seed 0), and its plain config."""
    plain = OmegaConf.to_container(compose_run([f"model={model}", f"method={method}", *overrides], tmp_path), resolve=True)
    torch.manual_seed(0)
    net = rebuild_model(plain)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial adapters
        for _, layer in adapter_layers(net):
            for p in layer.adapter_parameters():
                p.normal_(0, 0.1)
    return net.eval(), plain


def removed(width: int, keep: list[int]) -> torch.Tensor:
    return torch.tensor(sorted(set(range(width)) - set(keep)))


@torch.no_grad()
def zero_removed_stream(net: nn.Module, keep: list[int]) -> None:
    """Make the residual stream exactly zero on the channels not in ``keep``: embedding columns and every
    row a block writes into the stream (attention-out, FFN-out, their adapters)."""
    lay = layout_of(net)
    gone = removed(hidden_width(net), keep)
    for rel in lay.embeddings:
        net.base_model.get_submodule(rel).weight[:, gone] = 0
    for b in blocks(net):
        for rel in (lay.attn_out, lay.ffn_out):
            layer = b.linear(rel)
            layer.weight[gone] = 0
            if layer.bias is not None:
                layer.bias[gone] = 0
            for attr in ("lora_B", "adapter_up"):
                if hasattr(layer, attr):
                    getattr(layer, attr).weight[gone] = 0
                    if getattr(layer, attr).bias is not None:
                        getattr(layer, attr).bias[gone] = 0


@pytest.mark.parametrize("method", ["lora", "adapter", "full_ft"])
def test_llama_zero_channels_slice_exactly_with_rms_rescale(method, tmp_path):
    """LLaMA (RMSNorm, pre-norm): with the removed channels zero in the residual stream, the model sliced with
    ``rescale_rms`` gives the same logits; without the rescale it does not (the RMS is over fewer channels)."""
    net, _ = prepared("tiny_llama", method, tmp_path, *([ALL_LINEARS] if method == "lora" else []))
    zero_removed_stream(net, KEEP)
    with torch.no_grad():
        reference = net(input_ids=IDS).logits
    plain = copy.deepcopy(net)
    kv, flops_cfg = kv_cache_bytes_per_token(net), FlopsProfile.from_config(net.config)
    apply_plan(net, PruningPlan(hidden=KEEP, rescale_rms=True))
    apply_plan(plain, PruningPlan(hidden=KEEP))
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=IDS).logits, reference, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(plain(input_ids=IDS).logits, reference, rtol=1e-3, atol=1e-4)
    b = blocks(net)[0]
    assert hidden_width(net) == 20 and net.model.embed_tokens.weight.shape == (net.config.vocab_size, 20)
    assert b.linear("self_attn.q_proj").in_features == 20 and b.linear("mlp.down_proj").out_features == 20
    assert b.linear("input_layernorm").weight.shape == (20,) and net.score.in_features == 20
    assert kv_cache_bytes_per_token(net) == kv  # key/value widths stay
    assert FlopsProfile.from_model(net).hidden == 20 and FlopsProfile.from_config(net.config) == flops_cfg
    if method == "lora":
        q = b.linear("self_attn.q_proj")
        o = b.linear("self_attn.o_proj")
        assert q.lora_A.in_features == 20 and q.lora_B.out_features == q.out_features
        assert o.lora_B.out_features == 20 and o.lora_A.in_features == o.in_features


def test_tied_lm_head_stays_tied_and_exact():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, tie_word_embeddings=True,
    )  # fmt: skip
    net = LlamaForCausalLM(config).eval()
    assert net.lm_head.weight is net.model.embed_tokens.weight
    zero_removed_stream(net, KEEP)
    with torch.no_grad():
        reference = net(input_ids=IDS % 200).logits
    apply_plan(net, PruningPlan(hidden=KEEP, rescale_rms=True))
    assert net.lm_head.weight is net.model.embed_tokens.weight and net.lm_head.in_features == 20
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=IDS % 200).logits, reference, rtol=1e-5, atol=1e-6)


class KeptLayerNorm(nn.Module):
    """The reference for post-LN models: a LayerNorm whose statistics run over the kept channels only and whose
    output is zero on the removed ones."""

    def __init__(self, ln: nn.LayerNorm, keep: list[int]):
        super().__init__()
        self.ln, self.keep = ln, torch.tensor(keep)

    def forward(self, x):
        out = torch.zeros_like(x)
        k = self.keep
        out[..., k] = F.layer_norm(x[..., k], (len(k),), self.ln.weight[k], self.ln.bias[k], self.ln.eps)
        return out


@pytest.mark.parametrize("permute", [False, True], ids=["subset", "subset-reordered"])
def test_bert_slice_equals_kept_channel_layernorms(permute, tmp_path):
    """BERT (post-LN): slicing equals the original whose LayerNorms (embedding and block ones, where the
    stream is produced) normalise over the kept channels and output zero elsewhere; LoRA on every linear."""
    net, _ = prepared("tiny", "lora", tmp_path, ALL_LINEARS)
    keep = KEEP[::-1] if permute else KEEP
    ref = copy.deepcopy(net)
    lay = layout_of(ref)
    targets = [f"{ref.base_model_prefix}.{rel}" for rel in lay.base_norms]
    targets += [f"{b.name}.{rel}" for b in blocks(ref) for rel in lay.norms]
    for name in targets:
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, KeptLayerNorm(ref.get_submodule(name), keep))
    with torch.no_grad():
        expected = ref(input_ids=IDS).logits
        before = net(input_ids=IDS).logits
    apply_plan(net, PruningPlan(hidden=keep))
    with torch.no_grad():
        got = net(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, before, atol=1e-4)
    assert net.bert.embeddings.LayerNorm.normalized_shape == (20,)
    assert net.bert.pooler.dense.in_features == 20 and net.bert.pooler.dense.out_features == 32
    assert net.classifier.in_features == 32  # reads the pooler's output, not the stream
    prof = FlopsProfile.from_model(net)
    assert prof.hidden == 20 and prof.final_head() == 2 * 20 * 32 + 2 * 32 * 2


def test_plan_json_round_trip_and_composition(tmp_path):
    plan = PruningPlan(heads={0: [1, 0]}, neurons={1: [3, 2, 1]}, hidden=KEEP, rescale_rms=True)
    back = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    legacy = PruningPlan(heads={0: [1]})
    assert "hidden" not in legacy.to_dict() and PruningPlan.from_dict(legacy.to_dict()).hidden is None

    net, _ = prepared("tiny_llama", "lora", tmp_path, ALL_LINEARS)
    fresh = copy.deepcopy(net)
    first = PruningPlan(heads={0: [1]}, hidden=KEEP, rescale_rms=True)
    second = PruningPlan(neurons={1: list(range(0, 64, 2))}, hidden=list(range(0, 20, 2)), rescale_rms=True)
    apply_plan(apply_plan(net, first), second)
    both = first.then(second)
    assert both.hidden == [KEEP[i] for i in range(0, 20, 2)] and both.heads == {0: [1]} and both.rescale_rms
    assert first.then(PruningPlan(neurons={0: [1]})).hidden == KEEP  # a later plan without hidden keeps it
    apply_plan(fresh, both)
    a, b = net.state_dict(), fresh.state_dict()
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert blocks(fresh)[1].linear("self_attn.v_proj").in_features == 10
    assert fresh.model.layers[0].input_layernorm.variance_epsilon == pytest.approx(
        net.model.layers[0].input_layernorm.variance_epsilon
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, net(input_ids=IDS).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rescaling"):
        first.then(PruningPlan(hidden=[0, 1]))
    with pytest.raises(ValueError, match="distinct indices"):
        apply_plan(copy.deepcopy(fresh), PruningPlan(hidden=[0, 0]))


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_checkpoint_resume_and_export_reload_reapply_the_plan(model, tmp_path):
    """A checkpoint and an export of a hidden-pruned model load into freshly built models (the plan is
    re-applied before the weights load) with identical outputs."""
    from lightmods.config import validate
    from lightmods.data.tasks import get_task
    from lightmods.methods import build_method
    from lightmods.modules.task_module import TaskModule

    net, plain = prepared(model, "lora", tmp_path, ALL_LINEARS)
    rc = validate(OmegaConf.create(plain))
    method = build_method(rc.method)
    method.family = None
    module = TaskModule(net, get_task(rc.data.task), 1e-3, rc.optim, run_config=plain, method=method)
    module.restructure(PruningPlan(heads={1: [0]}, hidden=KEEP, rescale_rms=model == "tiny_llama"))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
        expected = net(input_ids=IDS).logits
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt = torch.load(_save(ckpt, tmp_path / "c.ckpt"), weights_only=True)
    assert ckpt["lightmods"]["plan"]["hidden"] == KEEP

    fresh = TaskModule(rebuild_model(plain), get_task(rc.data.task), 1e-3, rc.optim, run_config=plain, method=method)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(input_ids=IDS).logits, expected, rtol=0, atol=0)

    out = export_model(net, tmp_path / "export", plain, (), rc.method.name, plan=module.plan)
    reloaded = load_export(out)
    assert hidden_width(reloaded) == 20
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=0, atol=0)


def _save(obj, path):
    torch.save(obj, path)
    return path
