"""WID's compactor core: identity compactors are the teacher; masked compactor model == merged smaller dense
model; the shared hidden mask keeps every layer's width consistent."""

from __future__ import annotations

import copy

import pytest
import torch

from lightmods.structure import apply_plan, blocks
from lightmods.structure.compactors import (
    CompactedLinear,
    CompactorMasks,
    add_compactors,
    compactors,
    masked_entries,
    merge_compactors,
    zero_masked_,
)
from lightmods.structure.hidden_gate import attach_hidden_gate, hidden_sites
from tests.test_mask_prune import ids_for


def teacher(model: str):
    from pathlib import Path

    from omegaconf import OmegaConf

    from lightmods.export import rebuild_model
    from tests.conftest import compose_run

    cfg = compose_run([f"model={model}", "method=full_ft"], Path("/nonexistent/wid"))
    return rebuild_model(OmegaConf.to_container(cfg, resolve=True)).eval()


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_identity_compactors_reproduce_the_teacher(model):
    t = teacher(model)
    s = copy.deepcopy(t)
    names = add_compactors(s)
    assert len(names) == 2 * (7 if model == "tiny_llama" else 6) == len(compactors(s))
    batch = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(s(**batch).logits, t(**batch).logits, rtol=0, atol=0)


def random_masks(model, seed: int) -> CompactorMasks:
    g = torch.Generator().manual_seed(seed)
    m = CompactorMasks.full(model)
    keep = lambda n: torch.cat([torch.ones(1, dtype=torch.bool), torch.rand(n - 1, generator=g) > 0.4])  # noqa: E731
    return CompactorMasks(keep(m.hidden.numel()), [keep(n.numel()) for n in m.neurons], [keep(u.numel()) for u in m.units])


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_masked_compactor_model_equals_the_merged_dense_student(model):
    s = teacher(model)
    add_compactors(s)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking compactors: identity plus noise
        for _, layer in compactors(s):
            layer.row.add_(0.05 * torch.randn(layer.row.shape, generator=g))
            layer.col.add_(0.05 * torch.randn(layer.col.shape, generator=g))
    masks = random_masks(s, 6)
    assert not masks.hidden.all()
    zero_masked_(s, masks)
    student = apply_plan(merge_compactors(copy.deepcopy(s)), masks.to_plan(s)).eval()
    assert not compactors(student) and all(type(b.linear(b.layout.query)) is torch.nn.Linear for b in blocks(student))
    d = int(masks.hidden.sum())
    for b, n in zip(blocks(student), masks.neurons):  # the shared mask: one width everywhere
        lay = b.layout
        assert {b.linear(r).in_features for r in (lay.query, lay.key, lay.value, *lay.ffn_in)} == {d}
        assert {b.linear(r).out_features for r in (lay.attn_out, lay.ffn_out)} == {d}
        assert b.num_neurons == int(n.sum())
    gate = masks.hidden.float()
    attach_hidden_gate(gate, hidden_sites(s))  # norms over the kept channels, as the student's sliced norms
    batch = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, s(**batch).logits, rtol=1e-4, atol=1e-5)


def test_shared_hidden_mask_acts_on_every_hidden_compactor():
    s = teacher("tiny")
    add_compactors(s)
    masks = random_masks(s, 7)
    masks.neurons = [torch.ones_like(n) for n in masks.neurons]
    masks.units = [torch.ones_like(u) for u in masks.units]
    entries = masked_entries(s, masks)
    dropped = torch.nonzero(~masks.hidden).flatten()
    assert len(entries) == 2 * 6  # every block linear has one hidden side
    for _, m in entries:
        if m.any(dim=1).all():  # a column compactor: masked columns are the dropped hidden channels
            assert torch.equal(torch.nonzero(m.all(dim=0)).flatten(), dropped)
        else:
            assert torch.equal(torch.nonzero(m.all(dim=1)).flatten(), dropped)
    zero_masked_(s, masks)
    for _, layer in compactors(s):
        assert isinstance(layer, CompactedLinear)


# ---- method=wid: the gradient rule, the mask schedule, runs end to end, resume, bad configs ---------------------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from lightmods.config import validate  # noqa: E402
from lightmods.errors import ConfigError  # noqa: E402
from lightmods.export import load_checkpoint_model, load_export, rebuild_model  # noqa: E402
from lightmods.methods.wid import (  # noqa: E402
    decay_masked_,
    decay_rate,
    get_state,
    kept_at_round,
    mask_round,
    masked_residual,
    shrink_masked_grads_,
)
from lightmods.run import train  # noqa: E402
from tests.conftest import assert_same_run, compose_run, crash_at_epoch  # noqa: E402

UNUSED = Path("/nonexistent/wid")
FAST = ["data.max_train_samples=64", "data.max_eval_samples=32", "data.batch_size=16", "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=false"]  # fmt: skip


def wid_model(model: str = "tiny", *overrides: str):
    """A tiny model prepared by ``method=wid`` (compactors, masks, gate) and its method object."""
    from lightmods.methods import build_method

    plain = OmegaConf.to_container(compose_run([f"model={model}", "method=wid", "method.teacher=/nonexistent", *overrides], UNUSED), resolve=True)
    return rebuild_model(plain), build_method(validate(OmegaConf.create(plain)).method)


def test_gradient_on_masked_entries_is_the_l2_penalty_and_adam_sees_lambda_w():
    model, method = wid_model()
    targets = method.target_widths(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in compactors(model):
            layer.row.add_(0.01 * torch.randn(layer.row.shape, generator=g))
    masks = mask_round(model, targets, 1, 2)
    assert not masks.hidden.all() and not masks.neurons[0].all() and not masks.units[0].all()
    params = [p for _, layer in compactors(model) for p in (layer.row, layer.col)]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    batch = ids_for("tiny")
    model(**batch).logits.pow(2).sum().backward()
    opt.step()  # Adam state exists
    opt.zero_grad()
    model(**batch).logits.pow(2).sum().backward()
    task = {id(p): p.grad.clone() for p in params}
    m_prev = {id(p): opt.state[p]["exp_avg"].clone() for p in params}
    v_prev = {id(p): opt.state[p]["exp_avg_sq"].clone() for p in params}
    entries = masked_entries(model, masks)
    assert len(entries) > 0
    plain = [(p, m, p.detach().clone()) for p, m in entries]
    shrink_masked_grads_(model, masks, 20.0, opt)
    for p, m, w in plain:
        torch.testing.assert_close(p.grad[m], w[m], rtol=0, atol=0)  # the gradient is w ...
        torch.testing.assert_close(p.grad[~m], task[id(p)][~m], rtol=0, atol=0)  # unmasked: the task gradient
    opt.step()
    for p, m, w in plain:  # ... the first moment saw 20 w, the second w^2
        torch.testing.assert_close(opt.state[p]["exp_avg"][m], 0.9 * m_prev[id(p)][m] + 0.1 * 20.0 * w[m], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"][m], 0.999 * v_prev[id(p)][m] + 0.001 * w[m] ** 2, rtol=1e-5, atol=1e-9)
    for p in params:
        p.grad = None
    shrink_masked_grads_(model, masks, 20.0)  # without Adam: the gradient is 20 w
    for p, m, _ in plain:
        torch.testing.assert_close(p.grad[m], 20.0 * p.detach()[m], rtol=0, atol=0)


def test_masks_shrink_progressively_to_the_target_and_the_default_schedule_fits_the_run():
    from lightmods.callbacks.wid import WidTraining, shrink_start

    assert [kept_at_round(384, 192, k, 16) for k in (0, 1, 8, 16, 20)] == [384, 372, 288, 192, 192]
    model, method = wid_model("tiny", "method.target_ratio=0.25")
    targets = method.target_widths(model)
    assert targets == {"hidden": 8, "ffn": 16, "units": 1}
    previous = get_state(model).masks()
    for k in range(1, 5):
        masks = mask_round(model, targets, k, 4)
        assert bool((masks.hidden <= previous.hidden).all()) and int(masks.hidden.sum()) == kept_at_round(32, 8, k, 4)
        assert all(int(n.sum()) == kept_at_round(64, 16, k, 4) and bool((n <= o).all()) for n, o in zip(masks.neurons, previous.neurons))
        previous = masks
    assert int(previous.hidden.sum()) == 8 and [int(u.sum()) for u in previous.units] == [1, 1]
    assert masked_residual(model, previous) == pytest.approx(1.0)  # identity rows/columns: norm 1 each
    zero_masked_(model, previous)
    assert masked_residual(model, previous) == 0.0
    assert method.config.shrink_window == 0  # decoupled shrinking fits its rate to what is left
    for total, last in ((12, 6), (300, 144), (1000, 496)):  # w_step null: every round by mask_end
        w_step, rounds, merge_at = WidTraining(method.config, method).schedule(total)
        assert merge_at == total and w_step * rounds == last and rounds == min(16, last) and last <= total // 2
    _, method = wid_model("tiny", "method.shrink=gradient", "method.compactor_lr=5e-4")
    assert method.config.shrink_window == 200  # 2 / (l2_lambda 20 x compactor_lr 5e-4)
    for total, last in ((12, 1), (300, 96), (1000, 496)):  # gradient rule: also 200 steps before the merge
        w_step, rounds, merge_at = WidTraining(method.config, method).schedule(total)
        assert merge_at == total and w_step * rounds == last and rounds == min(16, last)
        assert w_step * rounds <= total // 2 and (total - last >= 200 or rounds == 1)
    _, method = wid_model("tiny", "method.shrink=gradient", "method.shrink_steps=0", "method.compactor_lr=1e-3")
    assert method.config.shrink_window == 0 and WidTraining(method.config, method).schedule(300) == (9, 16, 300)
    _, method = wid_model("tiny", "method.shrink=gradient", "method.compactor_lr=1e-3", "method.merge_step=250")
    assert method.config.shrink_window == 100 and WidTraining(method.config, method).schedule(300) == (7, 16, 250)
    linear = lambda t: 1 - t / 300  # noqa: E731  (linear decay to 0 at step 300: the mass left from s is (300 - s)^2 / 600)
    assert shrink_start(300, 100, linear) == 55 and shrink_start(300, 1000, linear) == 0 and shrink_start(300, 100, lambda t: 1.0) == 200
    assert WidTraining(method.config, method).schedule(300, linear) == (3, 16, 250)  # merge at 250: (250 - s) ... mass >= 100


def test_decoupled_shrinking_decays_masked_entries_outside_adam():
    model, method = wid_model()
    masks = mask_round(model, method.target_widths(model), 4, 4)
    comp = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(comp, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for p in comp:  # one ordinary step first, so Adam has moments for every entry
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    entries = masked_entries(model, masks)
    before = [p.detach().clone() for p, _ in entries]
    for p in comp:
        p.grad = torch.randn(p.shape, generator=g)
    rho = decay_rate(10)
    assert (1 - rho) ** 10 == pytest.approx(0.01) and decay_rate(0) == 1.0
    assert decay_masked_(model, masks, rho, opt) == sum(int(m.sum()) for _, m in entries)
    opt.step()
    for (p, m), b in zip(entries, before):
        torch.testing.assert_close(p.detach()[m], (1 - rho) * b[m], rtol=1e-6, atol=0)  # exactly the decay: Adam moved them by 0
        assert not torch.equal(p.detach()[~m], b[~m])  # the kept entries trained


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Teachers (1-2 full_ft steps) and WID runs: tiny with a mid-run merge (step 6 of 12, decoupled shrinking),
    tiny_llama merging at the end (step 8, the official gradient rule)."""
    root = tmp_path_factory.mktemp("wid")
    out = {"root": root}
    for model in ("tiny", "tiny_llama"):
        train(compose_run([f"model={model}", *FAST, "method=full_ft", "trainer.max_steps=2"], root / f"teacher_{model}"))
    out["tiny"] = ["model=tiny", *FAST, "method=wid", f"method.teacher={root / 'teacher_tiny' / 'export'}", "trainer.max_epochs=3",
                   "method.merge_step=6", "method.inference_batches=1", "method.shrink_steps=0"]  # fmt: skip
    train(compose_run(out["tiny"], root / "tiny"))
    llama = ["model=tiny_llama", *FAST, "method=wid", f"method.teacher={root / 'teacher_tiny_llama' / 'export'}", "trainer.max_epochs=2",
             "method.inference_batches=1", "method.shrink=gradient"]  # fmt: skip
    train(compose_run(llama, root / "llama"))
    return out


def read(run_dir, name: str) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


@pytest.mark.parametrize("run,merged_at,decoder", [("tiny", 6, False), ("llama", 8, True)])
def test_end_to_end_merges_into_a_smaller_dense_student_that_reloads_identically(runs, run, merged_at, decoder):
    out = runs["root"] / run
    s = read(out, "summary.json")
    assert s["status"] == "completed" and s["merged_at_step"] == merged_at
    assert s["params_after"] < 0.75 * s["params_before"] and s["compression_ratio_params"] > 1.3
    assert s["flops_per_sample_after"] < s["flops_per_sample_before"] and s["speedup_inference"] > 0
    assert (s["kv_cache_bytes_per_token_after"] < s["kv_cache_bytes_per_token_before"]) if decoder else s["kv_cache_bytes_per_token_before"] is None
    assert s["hidden_after"] == s["hidden_before"] // 2 and s["params_final"] == s["params_after"]
    if run == "tiny":  # decoupled shrinking: rounds by mask_end, the last round's channels keep 1% at the merge
        assert s["mask_rounds"] == 3 and 0 < s["masked_residual"] <= 0.0101
    else:  # the gradient rule's shrink window does not fit 8 steps: all at step 1, and most of the norm is left (warned)
        assert s["mask_rounds"] == 1 and 0.5 < s["masked_residual"] < 1.1
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    kept = [float(r.split(",")[header.index("train/wid_hidden_kept")]) for r in rows[1:] if r.split(",")[header.index("train/wid_hidden_kept")]]
    assert kept == sorted(kept, reverse=True) and kept[0] == s["hidden_before"] and kept[-1] == s["hidden_after"]  # progressive
    reloaded = load_export(out / "export")
    assert not compactors(reloaded) and not any("wid_state" in k for k in reloaded.state_dict())
    b0 = blocks(reloaded)[0]
    assert b0.linear(b0.layout.query).in_features == s["hidden_after"] and b0.num_neurons == s["ffn_after_per_layer"][0]
    assert sum(p.numel() for p in reloaded.parameters()) == s["params_after"]
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    batch = ids_for(run)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("epoch", [1, 2])  # a crash at step 4 (before the merge at step 6) and at step 8 (after it)
def test_resume_before_and_after_the_merge_is_exact(runs, monkeypatch, epoch):
    root = runs["root"]
    last = crash_at_epoch(monkeypatch, compose_run(runs["tiny"], root / f"crashed{epoch}"), epoch)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 * epoch and bool(ckpt["lightmods"]["plan"]) == (epoch == 2)
    train(compose_run([*runs["tiny"], f"ckpt_path={last}"], root / f"resumed{epoch}"))
    a, b = root / "tiny", root / f"resumed{epoch}"
    assert_same_run(a, b)


@pytest.mark.parametrize(
    "override,key",
    [("method.target_ratio=0", "method.target_ratio"), ("method.target_ratio=1.5", "method.target_ratio"),
     ("method.l2_lambda=0.5", "method.l2_lambda"), ("method.w_step=0", "method.w_step"), ("method.shrink_steps=-1", "method.shrink_steps"), ("method.compactor_lr=-1", "method.compactor_lr"),
     ("method.shrink=fast", "method.shrink"),
     ("method.mask_end=0", "method.mask_end")],
)  # fmt: skip
def test_bad_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "='?" + override.split("=")[1]):
        validate(compose_run(["model=tiny", "method=wid", override], UNUSED))


def test_bad_run_settings_fail_early(runs, tmp_path):
    base = ["model=tiny", *FAST, "method=wid"]
    with pytest.raises(ConfigError, match=r"method\.teacher=None"):
        train(compose_run(base, tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"method\.teacher=.*teacher_tiny_llama.*model_type"):  # another architecture
        train(compose_run([*base, f"method.teacher={runs['root'] / 'teacher_tiny_llama' / 'export'}"], tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"method\.w_step=2"):  # 16 rounds of 2 steps do not fit 4 steps
        train(compose_run([*base, f"method.teacher={runs['root'] / 'teacher_tiny' / 'export'}", "method.w_step=2"], tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"method\.target_hidden=999"):
        wid_model("tiny", "method.target_hidden=999")
