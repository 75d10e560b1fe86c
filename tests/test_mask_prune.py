"""Mask-based structured pruning (SIMPLE): masks at 0/1 equal the physically extracted model, thresholds give
the requested sizes, the sparsity term, the run end to end (teacher, extraction, fine-tuning), resume,
export/reload, bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightmods.callbacks.mask_prune import bare_copy, count_params, plan_at_threshold, plan_for_size
from lightmods.config import validate
from lightmods.errors import ConfigError
from lightmods.export import load_checkpoint_model, load_export, rebuild_model
from lightmods.losses.mask_l1 import mask_l1, mask_l1_term
from lightmods.run import train
from lightmods.structure import blocks, get_gates
from tests.conftest import assert_same_run, compose_run, crash_at_epoch

# 64 rows / batch 16 = 4 steps per epoch: sparse training for 5 steps, extraction, fine-tuning to step 12.
UNUSED_DIR = Path("/nonexistent/mask_prune")  # configs composed only to build a model or be validated
MP = ("method=mask_prune", "method.sparse_steps=5", "trainer.max_epochs=3", "method.inference_batches=1")


def read(run_dir, name: str) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


def prepared(model: str, *overrides: str):
    """A freshly built tiny model prepared by ``method=mask_prune`` (gates on), and the method."""
    from lightmods.methods import build_method

    cfg = compose_run([f"model={model}", "method=mask_prune", *overrides], UNUSED_DIR)
    plain = OmegaConf.to_container(cfg, resolve=True)
    model = rebuild_model(plain).eval()
    return model, build_method(validate(OmegaConf.create(plain)).method)


def ids_for(model_name: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_masks_at_one_change_nothing(model):
    gated, _ = prepared(model)
    bare = bare_copy(gated, "cpu")
    batch = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(gated(**batch).logits, bare(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_binary_masks_equal_the_extracted_model(model):
    """Gates set to 0/1 (heads, neurons, hidden channels) compute what the physically sliced model computes."""
    gated, method = prepared(model)
    gates = get_gates(gated)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*gates.heads, *gates.neurons, gates.hidden]:
            p.copy_((torch.rand(p.shape, generator=g) > 0.4).float())
            p[0] = 1.0  # at least one survivor each
    plan = plan_at_threshold(gates, blocks(gated), 0.5)
    assert plan.hidden is not None and len(plan.hidden) < 32
    extracted = method.restructure(bare_copy(gated, "cpu"), plan).eval()
    b0 = blocks(extracted)[0]
    assert b0.linear(b0.layout.query).in_features == len(plan.hidden)
    assert b0.num_neurons == len(plan.neurons[0]) < 64
    assert count_params(extracted) < count_params(bare_copy(gated, "cpu"))
    batch = ids_for(model)
    with torch.no_grad():
        masked, sliced = gated(**batch).logits, extracted(**batch).logits
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-5)
    assert masked.abs().sum() > 0


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_real_valued_masks_are_folded_into_the_extracted_weights(model):
    """Surviving gates with real values (heads and neurons in (0.2, 1.5), kept hidden channels at one value):
    the extracted model equals the masked one with the pruned gates at 0, through the callback's copy and
    through the live restructure alike; ``fold_masks=false`` (survivors as 1) does not."""
    from lightmods.callbacks.mask_prune import MaskPruning

    gated, method = prepared(model)
    gates = get_gates(gated)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*gates.heads, *gates.neurons]:
            p.copy_(0.2 + 1.3 * torch.rand(p.shape, generator=g))
            p[torch.rand(p.shape, generator=g) > 0.6] = 0.01
            p[0] = 0.9
        gates.hidden.copy_(torch.where(torch.rand(32, generator=g) > 0.3, 0.7, 0.01))
        gates.hidden[0] = 0.7
    plan = plan_at_threshold(gates, blocks(gated), 0.05)
    assert plan.hidden is not None and len(plan.hidden) < 32
    batch = ids_for(model)
    with torch.no_grad():
        for p in [*gates.heads, *gates.neurons, gates.hidden]:  # the pruned structures' gates to exactly 0
            p[p.abs() <= 0.05] = 0.0
        masked = gated(**batch).logits
        extracted = method.restructure(MaskPruning(method.config, method)._extraction_copy(gated, "cpu"), plan).eval()
        unfolded = method.restructure(bare_copy(gated, "cpu"), plan).eval()
        torch.testing.assert_close(extracted(**batch).logits, masked, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(unfolded(**batch).logits, masked, rtol=1e-4, atol=1e-5)  # survivors reset to 1: another model
        method.restructure(gated, plan)  # the live model (mid-fit): folded, gates gone
        assert get_gates(gated) is None
        torch.testing.assert_close(gated.eval()(**batch).logits, masked, rtol=1e-4, atol=1e-5)
    _, off = prepared(model, "method.fold_masks=false")
    assert off.config.fold_masks is False


@pytest.mark.parametrize("scope", ["global", "per_kind"])
def test_thresholds_give_the_requested_sizes(scope):
    gated, method = prepared("tiny")
    gates = get_gates(gated)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*gates.heads, *gates.neurons, gates.hidden]:
            p.copy_(torch.rand(p.shape, generator=g))
    total = count_params(bare_copy(gated))
    got = []
    for size in (0.9, 0.75, 0.5):
        plan, cut, kept, full = plan_for_size(gated, method.restructure, size, scope)
        assert full == total
        assert kept == count_params(method.restructure(bare_copy(gated, "cpu"), plan))
        # at most the requested share, and within one hidden channel (~3% of tiny's parameters) of it
        assert size - 0.04 < kept / total <= size
        got.append(kept)
    assert got == sorted(got, reverse=True)


def test_mask_l1_equals_hand_computation():
    gated, _ = prepared("tiny")
    gates = get_gates(gated)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*gates.heads, *gates.neurons, gates.hidden]:
            p.copy_(torch.randn(p.shape, generator=g))
    hand = sum(float(p.detach().abs().sum()) for p in [*gates.heads, *gates.neurons, gates.hidden])
    assert abs(float(mask_l1(gated)) - hand) < 1e-4
    term = mask_l1_term(0.5, start_step=0, warmup_steps=4, end_step=10)

    class M:
        model = gated

    assert abs(float(term(M, {}, torch.zeros(1))) - hand) < 1e-4
    assert [term.weight_at(s) for s in (0, 1, 3, 9, 10)] == [0.125, 0.25, 0.5, 0.5, 0.0]
    gated(**ids_for("tiny")).logits.sum().backward()  # the hidden gate acts through its hooks: it gets gradients
    assert gates.hidden.grad is not None and gates.hidden.grad.abs().sum() > 0
    assert mask_l1(bare_copy(gated, "cpu")) is None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fine-tuned teacher, then mask pruning distilled from it (one run, reused by the checks below)."""
    root = tmp_path_factory.mktemp("mask_prune")
    fast = ["model=tiny", "data.max_train_samples=64", "data.max_eval_samples=32", "data.batch_size=16",
            "trainer.log_every_n_steps=1", "callbacks.progress_bar=false"]  # fmt: skip
    teacher = compose_run([*fast, "method=full_ft", "trainer.max_epochs=1"], root / "teacher")
    train(teacher)
    mp = [*fast, *MP, f"method.teacher={root / 'teacher' / 'export'}"]
    straight = compose_run(mp, root / "straight")
    train(straight)
    return {"root": root, "mp": mp, "straight": root / "straight"}


def test_end_to_end_with_teacher_extraction_and_finetuning(runs):
    out = runs["straight"]
    s = read(out, "summary.json")
    assert s["status"] == "completed" and s["global_step"] == 12 and s["extracted_at_step"] == 5
    assert s["finetune_size"] == 0.5 and set(s["sizes"]) == {"0.75", "0.5"}
    for key in ("params", "flops_per_sample", "inference_samples_per_s"):
        for size in ("0.75", "0.5"):
            assert s["sizes"][size][f"{key}_after"] < s["sizes"][size][f"{key}_before"] or key == "inference_samples_per_s"
    assert s["sizes"]["0.5"]["params_after"] < s["sizes"]["0.75"]["params_after"] <= 0.75 * s["params_before"]
    assert s["compression_ratio_params"] == s["sizes"]["0.5"]["compression_ratio_params"] >= 2
    assert s["speedup_inference"] > 0 and s["params_final"] == s["params_after"]
    # distillation terms were trained on: logits throughout, hidden states after extraction
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = {k: header.index(k) for k in ("step", "train/loss_kd", "train/loss_rep", "train/loss_mask_l1")}
    vals = [r.split(",") for r in rows[1:]]
    rep = {int(v[col["step"]]): float(v[col["train/loss_rep"]]) for v in vals if v[col["train/loss_rep"]]}
    assert all(x == 0 for st, x in rep.items() if st < 5) and any(x > 0 for st, x in rep.items() if st >= 5)
    assert any(v[col["train/loss_kd"]] and float(v[col["train/loss_kd"]]) > 0 for v in vals)
    # each extracted size reloads from its export with the plan's shapes and the size's parameter count
    for size in ("0.75", "0.5"):
        model = load_export(s["sizes"][size]["export"])
        assert count_params(model) == s["sizes"][size]["params_after"]
        assert [b.num_neurons for b in blocks(model)] == s["sizes"][size]["neurons_kept_per_layer"]


def test_export_reloads_with_identical_outputs(runs):
    out = runs["straight"]
    reloaded = load_export(out / "export")
    assert not any("structure_gates" in k for k in reloaded.state_dict())
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    batch = ids_for("tiny")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)


def test_resume_after_extraction_is_exact(runs, monkeypatch):
    root = runs["root"]
    last = crash_at_epoch(monkeypatch, compose_run(runs["mp"], root / "crashed"), 2)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["lightmods"]["plan"]["hidden"]
    resumed = compose_run([*runs["mp"], f"ckpt_path={last}"], root / "resumed")
    train(resumed)
    a, b = runs["straight"], root / "resumed"
    assert_same_run(a, b)


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.extract_sizes=[]", "method.extract_sizes"),
        ("method.extract_sizes=[0.5,1.5]", "method.extract_sizes"),
        ("method.finetune_size=0.6", "method.finetune_size"),
        ("method.sparse_steps=0", "method.sparse_steps"),
        ("method.threshold_scope=layer", "method.threshold_scope"),
        ("method.mask_lr=-1", "method.mask_lr"),
    ],
)
def test_bad_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_run(["model=tiny", "method=mask_prune", override], UNUSED_DIR))


def test_bad_run_settings_fail_early(run_cfg):
    with pytest.raises(ConfigError, match=r"method\.prune_hidden"):
        validate(run_cfg("method=mask_prune", "method.prune_heads=false", "method.prune_neurons=false", "method.prune_hidden=false"))
    with pytest.raises(ConfigError, match=r"method\.sparse_steps=50"):  # the run has only 4 steps
        train(run_cfg("method=mask_prune", "method.sparse_steps=50"))
    with pytest.raises(ConfigError, match=r"method\.teacher"):  # a teacher of another width
        wide = run_cfg("method=full_ft", "model.arch.hidden_size=48", "trainer.max_steps=1")
        train(wide)
        train(run_cfg("method=mask_prune", f"method.teacher={Path(wide.paths.output_dir) / 'export'}"))
