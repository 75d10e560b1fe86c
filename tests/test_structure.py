"""The structural core: gates vs physical slicing, plans, optimizer-state carry-over."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightmods.callbacks.early_pruning import keep_top, n_to_prune
from lightmods.peft import LoraLinear
from lightmods.peft.layer import select_linear
from lightmods.structure import (
    PruningPlan,
    add_gates,
    apply_plan,
    blocks,
    carry_optimizer_state,
    remove_gates,
)
from lightmods.structure.importance import output_ratio, rank_taylor
from tests.test_peft import build


def _randomise_adapters(net: nn.Module) -> None:
    torch.manual_seed(1)
    for m in net.modules():
        for attr in ("lora_B", "adapter_up"):
            if hasattr(m, attr):
                nn.init.normal_(getattr(m, attr).weight, std=0.1)


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
@pytest.mark.parametrize("method", ["full_ft", "lora", "moslora", "adapter"])
def test_zero_gates_equal_physical_slicing(model, method, tmp_path):
    """Gates at 0/1 on heads and neurons give the same outputs as the model physically sliced to the kept
    ones, adapters (LoRA B rows, A columns) included, for encoders and grouped-query decoders."""
    overrides = ["method.target_modules=null"] if method != "full_ft" else []
    if method in ("lora", "moslora"):  # every linear of the block, so the slicing of A and B is exercised
        overrides = [
            "method.target_modules=[query,key,value,dense,q_proj,k_proj,v_proj,o_proj,up_proj,gate_proj,down_proj]"
        ]
    net, _, batch = build(model, method, tmp_path, *overrides)
    _randomise_adapters(net)
    net.eval()
    gates = add_gates(net)
    units = blocks(net)[0].num_units
    heads = {0: [units - 1], 1: list(range(units))[::-1]}  # drop and reorder
    neurons = {0: list(range(0, 64, 3)), 1: [5, 1, 2]}
    with torch.no_grad():
        for i, keep in heads.items():
            gates.heads[i].zero_()
            gates.heads[i][keep] = 1
        for i, keep in neurons.items():
            gates.neurons[i].zero_()
            gates.neurons[i][keep] = 1
        masked = net(**batch).logits
    remove_gates(net)
    apply_plan(net, PruningPlan(heads=heads, neurons=neurons))
    with torch.no_grad():
        sliced = net(**batch).logits
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    b = blocks(net)
    assert [x.num_units for x in b] == [1, units] and [x.num_neurons for x in b] == [22, 3]


@pytest.mark.parametrize("n", [4, 12, 16, 17, 64, 1000])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 1 / 3, 0.3333333333, 0.5, 0.75])
def test_selection_matches_numpy_quantile_rule(n, ratio):
    """Kept = scores strictly above numpy's linear ``ratio`` quantile, as in the official code."""
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = (
        [i for i, s in enumerate(scores.numpy()) if s > np.quantile(scores.numpy(), ratio)]
        if ratio
        else list(range(n))
    )
    assert keep_top(scores, ratio) == expected
    assert n_to_prune(n, ratio) == n - len(expected)


def test_selection_with_ties_keeps_the_count():
    assert len(keep_top(torch.ones(16), 1 / 3)) == 16 - n_to_prune(16, 1 / 3)
    assert keep_top(torch.zeros(3), 0.99, minimum=1) == [2]


def test_rank_taylor_and_output_ratio_formulas():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5), rank=3)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 6)
    layer(x).pow(2).sum().backward()
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = torch.stack(
        [(a[r] * a.grad[r]).mean().abs() + (b[:, r] * b.grad[:, r]).mean().abs() for r in range(3)]
    )
    torch.testing.assert_close(rank_taylor(layer), expected)
    with torch.no_grad():
        base, out = layer.base_layer(x), layer(x)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    per_token = (out - base).norm(dim=-1) / base.norm(dim=-1)
    torch.testing.assert_close(output_ratio(out, base, mask), per_token[mask.bool()].mean())


def test_plan_round_trip_and_composition():
    first = PruningPlan(heads={0: [0, 2, 3]}, neurons={1: [1, 4, 5, 7]}, ranks={"a": [0, 1, 2, 5]})
    later = PruningPlan(heads={0: [2]}, neurons={1: [0, 3]}, ranks={"a": [1, 3]}, removed_adapters=["b"])
    both = first.then(later)
    assert both.heads == {0: [3]} and both.neurons == {1: [1, 7]} and both.ranks == {"a": [1, 5]}
    assert PruningPlan.from_dict(both.to_dict()) == both


def test_optimizer_state_follows_sliced_parameters():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(3, 4)).sum().backward()
    opt.step()
    old_w, old_state = lin.weight, {k: v.clone() for k, v in opt.state[lin.weight].items()}
    rows, cols = torch.tensor([5, 0, 2]), torch.tensor([3, 1])
    select_linear(lin, out_index=rows, in_index=cols)
    new_opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    assert carry_optimizer_state(opt, new_opt) == 2
    got = new_opt.state[lin.weight]
    torch.testing.assert_close(got["exp_avg"], old_state["exp_avg"][rows][:, cols])
    torch.testing.assert_close(got["exp_avg_sq"], old_state["exp_avg_sq"][rows][:, cols])
    assert torch.equal(got["step"], old_state["step"])
    torch.testing.assert_close(lin.weight.detach(), old_w.detach()[rows][:, cols])


def test_kv_cache_bytes_count_key_and_value_widths_and_shrink_with_units(tmp_path):
    from lightmods.structure.kv_cache import kv_cache_bytes, kv_cache_bytes_per_token

    model, _, _ = build("tiny_llama", "full_ft", tmp_path)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    full = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # fp32
    assert kv_cache_bytes_per_token(model) == full
    assert kv_cache_bytes(model, seq_len=10, batch_size=3) == 30 * full
    apply_plan(model, PruningPlan(heads={0: [1]}))  # layer 0 keeps one of its two key/value heads
    assert kv_cache_bytes_per_token(model) == full - 2 * head_dim * 4
    assert kv_cache_bytes_per_token(model, bytes_per_value=2) == (full - 2 * head_dim * 4) // 2
