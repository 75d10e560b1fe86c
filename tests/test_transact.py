"""TransAct: transitional-activation norms against a hand computation, top-norm selection, plan == zeroed
gates (encoder and grouped-query decoder), the shot schedule, end to end with KV-cache accounting, resume after
a shot, export/reload, config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightmods.errors import ConfigError
from lightmods.export import load_checkpoint_model, load_export
from lightmods.methods.transact import shot_schedule, shot_size
from lightmods.run import train
from lightmods.structure import PruningPlan, add_gates, apply_plan, blocks, remove_gates
from lightmods.structure.importance import TransitionalActs
from lightmods.structure.slenderize import slender_plan
from tests.conftest import FAST, assert_same_run, compose_run, crash_at_epoch
from tests.test_peft import build

# 64 rows / batch 16 = 4 steps per epoch, 3 epochs = 12 steps; 2 shots at steps 0 and 6 (uniform, 6 steps each).
TA = (
    "method=transact", "trainer.max_epochs=3", "method.shots=2", "method.shot_steps=6",
    "method.shot_growth=uniform", "method.inference_batches=2", "method.calibration_samples=32",
)  # fmt: skip


@pytest.fixture(scope="module")
def straight_tiny(tmp_path_factory) -> Path:
    """One uninterrupted tiny run (full fine-tuning), shared by the end-to-end and the resume tests."""
    cfg = compose_run([*FAST, *TA], tmp_path_factory.mktemp("straight") / "run")
    train(cfg)
    return Path(cfg.paths.output_dir)


def read(run_dir, name: str) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


def score(net, batches) -> TransitionalActs:
    scores = TransitionalActs(net)
    with torch.no_grad():
        for b in batches:
            scores.token_mask = b["attention_mask"]
            net(**b)
    scores.remove()
    return scores


def split_rows(batch: dict) -> list[dict]:
    """One batch per row, padding cut to the row's length."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        out.append({k: v[i : i + 1, :n] for k, v in batch.items()})
    return out


def test_activation_norms_equal_a_hand_computation_on_bert(tmp_path):
    """Each channel's score is the L2 norm over non-padding tokens of the context vectors (computed here from
    the weights: softmax(QK^T/sqrt(d) + mask) V) and of GELU(LN(h + ctx Wo) W1), the FFN down projection's
    input; batch splitting does not change it."""
    net, _, batch = build("tiny", "transact", tmp_path)
    net.eval()
    assert (batch["attention_mask"] == 0).any()  # padding is present and must be left out
    scores = score(net, [batch])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = net(**batch, output_hidden_states=True).hidden_states
        for b, layer in zip(blocks(net), net.bert.encoder.layer):
            h, sa = hidden[b.index], layer.attention.self
            n, t, width = h.shape
            heads, d = 4, width // 4

            q, k, v = (lin(h).view(n, t, heads, d).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
            logits = q @ k.transpose(-1, -2) / math.sqrt(d)
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
            ctx = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, t, width)
            attn = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
            inter = F.gelu(layer.intermediate.dense(attn))
            torch.testing.assert_close(scores.attn_norms(b), ctx[mask].pow(2).sum(0).sqrt(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(scores.neuron_scores(b), inter[mask].pow(2).sum(0).sqrt(), rtol=1e-4, atol=1e-5)
            s = ctx[mask].pow(2).sum(0).sqrt().view(heads, d)
            torch.testing.assert_close(scores.head_scores(b), s.mean(1) + 10 / d * s.amax(1), rtol=1e-4, atol=1e-5)
    assert scores.tokens == int(mask.sum())
    split = score(net, split_rows(batch))
    for b in blocks(net):
        torch.testing.assert_close(split.attn_norms(b), scores.attn_norms(b), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split.neuron_scores(b), scores.neuron_scores(b), rtol=1e-5, atol=1e-6)


def test_grouped_query_units_sum_their_query_heads(tmp_path):
    """tiny_llama: 4 query heads in 2 key/value groups; a unit scores the sum of its two heads'
    ``mean + 10/d max`` over the o_proj input channels of non-padding tokens."""
    net, _, batch = build("tiny_llama", "transact", tmp_path)
    net.eval()
    seen: dict[int, torch.Tensor] = {}
    handles = [
        b.linear("self_attn.o_proj").register_forward_pre_hook(lambda m, a, i=b.index: seen.__setitem__(i, a[0]))
        for b in blocks(net)
    ]
    scores = score(net, [batch])
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].bool()
    for b in blocks(net):
        assert b.group == 2 and b.num_units == 2 and b.head_dim == 8
        norms = seen[b.index][mask].pow(2).sum(0).sqrt()
        torch.testing.assert_close(scores.attn_norms(b), norms)
        per_head = [norms[8 * j : 8 * (j + 1)] for j in range(4)]
        expected = [sum(float(x.mean() + 10 / 8 * x.max()) for x in per_head[2 * u : 2 * u + 2]) for u in range(2)]
        torch.testing.assert_close(scores.head_scores(b), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_selection_keeps_the_top_norm_units_and_neurons(tmp_path):
    net, _, batch = build("tiny", "transact", tmp_path)
    scores = score(net.eval(), [batch])
    g = torch.Generator().manual_seed(0)
    for b in blocks(net):  # known sums of squares
        scores.attn_sq[b.index] = torch.rand(32, generator=g)
        scores.ffn_sq[b.index] = torch.rand(64, generator=g)
    plan = slender_plan(scores, 3, 20)
    for b in blocks(net):
        units = scores.head_scores(b)
        assert plan.heads[b.index] == sorted(torch.topk(units, 3).indices.tolist())
        assert min(units[plan.heads[b.index]]) > max(u for i, u in enumerate(units) if i not in plan.heads[b.index])
        ffn = scores.ffn_sq[b.index]
        assert plan.neurons[b.index] == sorted(torch.topk(ffn, 20).indices.tolist())


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_plan_equals_the_model_with_zeroed_gates(model, tmp_path):
    """Slicing to the selected units/neurons gives the outputs of the full model whose other units and neurons
    are gated to 0 (for tiny_llama whole key/value groups with their query heads)."""
    net, _, batch = build(model, "transact", tmp_path)
    net.eval()
    plan = slender_plan(score(net, [batch]), 1, 24)
    gates = add_gates(net)
    with torch.no_grad():
        for b in blocks(net):
            gates.heads[b.index].zero_()[plan.heads[b.index]] = 1
            gates.neurons[b.index].zero_()[plan.neurons[b.index]] = 1
        masked = net(**batch).logits
    remove_gates(net)
    apply_plan(net, plan)
    with torch.no_grad():
        sliced = net(**batch).logits
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert [b.num_units for b in blocks(net)] == [1, 1] and [b.num_neurons for b in blocks(net)] == [24, 24]


def test_shot_sizes_and_schedule():
    sizes, cur = [], 64
    for i in range(1, 9):
        cur = shot_size(cur, 18, i, 8)
        sizes.append(cur)
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 18 and sizes[0] < 64
    sched = shot_schedule(total=1000, shots=8, mean_steps=50)  # official: P/2 + P(i-1)/(K-1), K P in all
    lengths = [b - a for a, b in zip(sched.starts, (*sched.starts[1:], sched.end))]
    assert sched.starts[0] == 0 and sched.end == 400 and lengths[0] == 25 and lengths[-1] == 75
    assert lengths == sorted(lengths)
    assert [sched.stage_at(s)[2] for s in sched.starts] == [2 * i / 8 for i in range(1, 9)]
    assert sched.stage_at(400) == (400, 600, 1.0)
    uniform = shot_schedule(total=12, shots=2, mean_steps=6, growth="uniform")
    assert uniform.starts == (0, 6) and uniform.end == 12


@pytest.mark.parametrize("model,train_kind", [("tiny", "full"), ("tiny_llama", "lora")])
def test_end_to_end_reaches_targets_shrinks_kv_cache_and_exports(run_cfg, straight_tiny, model, train_kind):
    if model == "tiny":
        out = straight_tiny
    else:
        cfg = run_cfg(*TA, f"model={model}", f"method.train={train_kind}")
        train(cfg)
        out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    assert s["status"] == "completed" and s["global_step"] == 12 and s["shots_done"] == 2
    assert s["shot_start_steps"] == [0, 6] and [x["step"] for x in s["shot_sizes"]] == [0, 6]
    units, group = (2, 2) if model == "tiny_llama" else (4, 1)
    assert s["heads_kept_per_layer"] == [units // 2 * group] * 2  # target_attn_ratio 0.5
    assert s["neurons_kept_per_layer"] == [math.ceil(0.28 * 64)] * 2  # target_ffn_ratio 0.28
    assert s["params_after"] < s["params_before"] and s["compression_ratio_params"] == round(s["params_before"] / s["params_after"], 4)
    assert s["flops_per_sample_after"] < s["flops_per_sample_before"] and s["flops_per_sample_after"] == s["flops_per_sample"]
    assert s["inference_samples_per_s_before"] > 0 and s["inference_samples_per_s_after"] > 0 and s["speedup_inference"] > 0
    if model == "tiny_llama":  # 2 layers x (keys + values) x units x head_dim 8 x 4 bytes; half the units go
        assert s["kv_cache_bytes_per_token_before"] == 2 * 2 * 2 * 8 * 4
        assert s["kv_cache_bytes_per_token_after"] == 2 * 2 * 1 * 8 * 4
        assert s["adapted_modules"] == 14
    else:
        assert s["kv_cache_bytes_per_token_before"] is None
    plan = read(out, "export/pruning_plan.json")  # indices of the original model, both shots composed
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["lightmods"]["plan"] == plan
    assert all(len(v) == units // 2 for v in plan["heads"].values()) and max(max(v) for v in plan["neurons"].values()) < 64
    reloaded = load_export(out / "export")
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


def test_resume_after_the_first_shot_reproduces_the_run(run_cfg, straight_tiny, monkeypatch):
    """A checkpoint saved after shot 1 (step 4) resumes into the pruned architecture, prunes shot 2 at step 6
    with the same decision and ends with the uninterrupted run's weights and metrics."""
    last = crash_at_epoch(monkeypatch, run_cfg(*TA), 1)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["callbacks"]["TransActShots"]["shots_done"] == 1
    first = PruningPlan.from_dict(ckpt["lightmods"]["plan"])
    assert all(len(v) == 3 for v in first.heads.values())  # shot 1 of 2: 4 -> 3 units
    resumed = run_cfg(*TA, f"ckpt_path={last}")
    train(resumed)
    a, b = straight_tiny, Path(resumed.paths.output_dir)
    sa, sb = read(a, "summary.json"), read(b, "summary.json")
    assert sb["shots_done"] == 2 and sb["params_before"] == sa["params_before"] and sb["params_after"] == sa["params_after"]
    assert_same_run(a, b)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (("method.train=partial",), "method.train"),
        (("method.target_attn_ratio=0",), "method.target_attn_ratio"),
        (("method.target_ffn_ratio=1.5",), "method.target_ffn_ratio"),
        (("method.shots=0",), "method.shots"),
        (("method.shot_growth=fast",), "method.shot_growth"),
        (("method.target_attn_dim=64",), "method.target_attn_dim"),  # tiny's attention width is 32
        (("method.target_ffn_dim=65",), "method.target_ffn_dim"),
        (("method.shot_steps=20",), "method.shot_steps"),  # the second shot would start after the run's 12 steps
        (("model=tiny_vit", "data=images/synthetic"), "method"),  # no block layout for ViT
    ],
)
def test_bad_configs_fail_naming_the_key(run_cfg, overrides, key):
    cfg = run_cfg(*TA, *overrides)
    with pytest.raises(ConfigError, match=f"{key}[=: ]"):
        train(cfg)


def test_learning_rate_restarts_per_shot_and_peaks_at_2i_over_k():
    from lightmods.methods.transact import TransAct, TransActConfig

    method = TransAct(TransActConfig(shots=4, shot_steps=20, shot_growth="uniform"))
    f = method.lr_lambda(200)  # shots at 0, 20, 40, 60; continued training 80..200
    for i, start in enumerate((0, 20, 40, 60), 1):
        assert f(start) == pytest.approx(2 * i / 4 * 1 / 2)  # first of 2 warm-up steps
        assert f(start + 2) == pytest.approx(2 * i / 4)  # the peak right after warm-up
        assert f(start + 19) < 0.05 * (2 * i / 4)  # cosine decay to ~0 at the shot's end
    assert f(80 + 12) == pytest.approx(1.0) and f(199) < 0.01
    assert TransAct(TransActConfig(lr_schedule="run")).lr_lambda(200) is None


def test_causal_lm_decoder_prunes_and_reloads(run_cfg, tmp_path):
    """tiny_llama as a causal LM (``data=lm/text``, perplexity): two shots, a smaller KV cache, the export reloads
    as a pruned ``LlamaForCausalLM`` with the trained outputs."""
    from tests.test_lm import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    cfg = run_cfg(
        "model=tiny_llama", "data=lm/text", f"data.data_dir={corpus}", "data.max_length=16", "data.batch_size=8",
        "method=transact", "method.shots=2", "method.shot_steps=2", "method.shot_growth=uniform",
        "method.inference_batches=1", "method.calibration_samples=16", "method.lr=1e-3",
    )  # fmt: skip
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    assert math.isfinite(metrics["val/perplexity"]) and s["shots_done"] == 2 and s["shot_start_steps"] == [0, 2]
    assert s["kv_cache_bytes_per_token_after"] == s["kv_cache_bytes_per_token_before"] // 2
    assert s["neurons_kept_per_layer"] == [18, 18] and s["params_after"] < s["params_before"]
    reloaded = load_export(out / "export")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
