"""Light-PEFT end to end on tiny models: estimation, physical pruning mid-training, resume, export, DDP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lightmods.export import load_checkpoint_model, load_export
from lightmods.run import train
from lightmods.structure import blocks
from tests.conftest import assert_same_run, crash_at_epoch, run_cli

# 64 rows / batch 16 = 4 steps per epoch; pruning after step 5, training goes on to step 12.
LP = ("method=light_peft", "method.estimate_steps=5", "trainer.max_epochs=3", "method.inference_batches=2")


def read(run_dir, name: str) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


def plan_of(run_dir) -> dict:
    return read(run_dir, "export/pruning_plan.json")


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_prunes_physically_and_training_continues(run_cfg, model):
    cfg = run_cfg(*LP, f"model={model}")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    assert s["status"] == "completed" and s["global_step"] == 12 and s["pruned_at_step"] == 5
    assert s["params_foundation_after"] < s["params_foundation_before"]
    assert s["params_trainable_after"] < s["params_trainable_before"]
    n_modules = 2 * (7 if model == "tiny_llama" else 6)  # LoRA on every linear layer of both blocks
    assert s["peft_modules_before"] == n_modules
    assert 1 <= s["peft_modules_after"] <= n_modules - (int((n_modules - 1) * 0.75) + 1)  # top 25% at most
    units = 2 if model == "tiny_llama" else 4  # key/value heads: the pruning unit
    group = 2 if model == "tiny_llama" else 1
    assert s["heads_kept_per_layer"] == [(units - 1) * group] * 2  # 1/3 of the units, per layer
    assert sum(s["neurons_kept_per_layer"]) == 128 - 43  # 1/3 of 2 x 64 neurons, chosen globally
    for key in (
        "train_samples_per_s_before",
        "train_samples_per_s_after",
        "inference_samples_per_s_before",
        "inference_samples_per_s_after",
    ):
        assert s[key] > 0, key
    # the plan is in the checkpoint and in export/; the export reloads with one call into the same weights
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lightmods"]["plan"] == plan_of(out)
    reloaded = load_export(out / "export")
    assert [b.num_neurons for b in blocks(reloaded)] == s["neurons_kept_per_layer"]
    assert not any("structure_gates" in k for k in reloaded.state_dict())
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()  # the final training state
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("crash_epoch,ckpt_step", [(1, 4), (2, 8)], ids=["before-pruning", "after-pruning"])
def test_resume_across_pruning_is_exact(run_cfg, monkeypatch, crash_epoch, ckpt_step):
    """A run resumed from a checkpoint saved before pruning prunes at the right step with the same plan; one
    saved after pruning resumes into the pruned architecture. Both end with the uninterrupted run's weights."""
    straight = run_cfg(*LP)
    train(straight)

    last = crash_at_epoch(monkeypatch, run_cfg(*LP), crash_epoch)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == ckpt_step and (ckpt["lightmods"]["plan"] is None) == (ckpt_step < 5)
    resumed = run_cfg(*LP, f"ckpt_path={last}")
    train(resumed)
    a, b = Path(straight.paths.output_dir), Path(resumed.paths.output_dir)
    assert plan_of(a) == plan_of(b)
    sa, sb = read(a, "summary.json"), read(b, "summary.json")
    assert sb["global_step"] == 12 and sb["pruned_at_step"] == 5
    assert sb["params_foundation_after"] == sa["params_foundation_after"]
    assert_same_run(a, b, plan=False)


@pytest.mark.parametrize(
    "overrides,foundation,peft",
    [
        (("method.prune_peft=false",), True, False),
        (("method.prune_foundation=false",), False, True),
        (("method.peft=none",), True, False),
        (("method.peft=adapter",), True, True),
        (("method.neuron_scope=layerwise", "method.random_scores=true"), True, True),
    ],
    ids=["foundation-only", "peft-only", "masks-full-ft", "adapters", "layerwise-random"],
)
def test_ablations(run_cfg, overrides, foundation, peft):
    cfg = run_cfg(*LP, *overrides)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    plan, s = plan_of(out), read(out, "summary.json")
    assert bool(plan["heads"]) == foundation and bool(plan["neurons"]) == foundation
    assert bool(plan["removed_adapters"]) == peft
    assert (s["params_foundation_after"] < s["params_foundation_before"]) == foundation
    if "method.neuron_scope=layerwise" in overrides:
        assert s["neurons_kept_per_layer"] == [43, 43]  # 21 of 64 pruned in each layer
    if "method.peft=none" in overrides:  # full fine-tuning: the sliced backbone keeps training
        assert s["params_trainable_after"] == s["params_final"]


def test_ddp_ranks_take_one_decision_and_continue(tmp_path):
    run_dir = tmp_path / "ddp"
    r = run_cli(
        "model=tiny", "data.max_train_samples=128", "data.max_eval_samples=32", "data.batch_size=16",
        "trainer=ddp_cpu", "trainer.max_epochs=3", "callbacks.progress_bar=false", *LP[:2], "method.inference_batches=1",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    s = read(run_dir, "summary.json")
    # 128 rows / (2 ranks x 16) = 4 steps per epoch: pruned at step 5, then 7 more steps on the smaller model
    assert s["status"] == "completed" and s["global_step"] == 12 and s["pruned_at_step"] == 5
    assert s["params_foundation_after"] < s["params_foundation_before"]
    logs = "".join(p.read_text() for p in run_dir.glob("*.log"))
    per_rank = dict(re.findall(r"rank (\d) validation metrics at the end of fit: (\{.*\})", logs))
    assert set(per_rank) == {"0", "1"} and per_rank["0"] == per_rank["1"]


def test_bench_prune_ratios_name_the_foundation_only_ablation():
    from experiments.bench.light_peft import parse_ratio, ratio_label, variant_name

    assert parse_ratio("0.5:0.4") == (0.5, 0.4, False) and parse_ratio("0.5:0.4:foundation") == (0.5, 0.4, True)
    assert ratio_label(variant_name(0.3333333333, 0.3333333333)) == "Light-PEFT (1/3, 1/3)"
    assert ratio_label(variant_name(0.3333333333, 0.3333333333, True)) == "Light-PEFT (1/3, 1/3, foundation only)"
    assert ratio_label(variant_name(0.5, 0.4, True)) == "Light-PEFT (0.5, 0.4, foundation only)"
    assert variant_name(0.5, 0.4) != variant_name(0.5, 0.4, True)  # separate run folders
    for bad in ("0.5", "0.5:0.5:peft", "0.5:0.5:foundation:x", "a:0.5", "0.5:1"):
        with pytest.raises(SystemExit, match="--prune-ratios"):
            parse_ratio(bad)


def test_bench_ideal_flops_leave_merged_lora_factors_out():
    from transformers import BertConfig, BertForSequenceClassification

    from experiments.bench.light_peft import block_flops_per_token
    from lightmods.peft import merge_adapters
    from lightmods.peft.inject import inject_adapters
    from lightmods.peft.lora import LoraLinear

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(cfg)
    bare = block_flops_per_token(model, seq_len=8)
    inject_adapters(model, ["query", "key", "value", "dense"], lambda lin: LoraLinear(lin, rank=4))
    merge_adapters(model)
    assert block_flops_per_token(model, seq_len=8) == bare > 0
