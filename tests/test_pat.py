"""PAT: the mask schedule, the losses, the exact HSM merge, and end-to-end runs on tiny_llama with resume and
export reload."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightmods.errors import ConfigError
from lightmods.export import load_checkpoint_model, load_export, rebuild_model
from lightmods.losses.identity import identity_loss
from lightmods.losses.mask_budget import mask_budget_loss
from lightmods.peft import adapter_layers
from lightmods.run import train
from lightmods.structure import PruningPlan, apply_plan, blocks, hidden_width
from lightmods.structure.hsm import DimDownMask, get_hsms, merge_hsms, remove_hsms, temperature
from tests.conftest import assert_same_run, compose_run, crash_at_epoch

IDS = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
# 64 rows / batch 16 = 4 steps per epoch: the mask schedule ends (and the HSMs merge) at step 12 of 16.
PAT = (
    "method=pat", "model=tiny_llama", "method.mask_steps=12", "method.merge_at=schedule", "method.lr=1e-2",
    "method.hsm_rank=8", "method.rank=4", "method.inference_batches=2", "trainer.max_epochs=4",
)  # fmt: skip


def read(run_dir, name: str) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


def pat_model(tmp_path, *overrides: str):
    plain = OmegaConf.to_container(
        compose_run(["model=tiny_llama", "method=pat", "method.hsm_rank=8", "method.rank=4", *overrides], tmp_path),
        resolve=True,
    )
    torch.manual_seed(0)
    return rebuild_model(plain).eval()


# ---- schedule and losses ---------------------------------------------------------------------------------------
def test_mask_schedule_follows_the_formula():
    g = 100
    mask = DimDownMask(5, horizon=g, target=3)
    values = torch.tensor([-0.6, -0.05, 0.0, 0.02, 0.5])
    with torch.no_grad():
        mask.mask.copy_(values)

    def expected(t: int) -> torch.Tensor:
        tt = t if t < 80 else 80  # int(0.8 G): temperature frozen there
        tau = 1.0 / (1.0 - math.log(max(1, tt)) / math.log(g) + 1e-6)
        bias = max(0.5 - t / g, 0.0)
        return 1.0 / (1.0 + torch.exp(torch.clamp(-tau * values, max=10.0))) + bias

    for t in (0, 1, 2, 10, 49, 50, 51, 79, 80, 81, 99, 100, 250):
        mask.step.fill_(t)
        s = mask.scale()
        torch.testing.assert_close(s, expected(t), rtol=1e-6, atol=1e-7, msg=f"step {t}")
        assert s.requires_grad == (t < 80)  # the mask is detached (frozen) from int(0.8 G) on
    assert mask.scale().min() > 0  # the clamp keeps every scale above 1 / (1 + e^10) in training
    assert temperature(8000, 10000) == pytest.approx(41.27, abs=0.01)  # the notes' tau(0.8 G) for G = 1e4
    mask.step.zero_()
    with torch.no_grad():
        mask.mask.zero_()
    torch.testing.assert_close(mask.scale(), torch.ones(5))  # step 0: the unpruned model
    with torch.no_grad():
        mask.mask.copy_(values)
    mask.binary = True
    assert mask.scale().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0] and mask.kept() == [3, 4]


def test_identity_and_mask_losses_equal_hand_computation():
    w = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])  # W W^T = [[5, 2], [2, 2]]
    assert identity_loss([w]).item() == pytest.approx(((5 - 1) ** 2 + 2 * 2**2 + (2 - 1) ** 2) / 4)
    assert identity_loss([w, torch.eye(2)]).item() == pytest.approx(25 / 4)
    m = torch.tensor([0.3, -0.2, 0.0, 0.7], requires_grad=True)
    loss = mask_budget_loss(m, target=2)
    # count(m >= 0) = 3: 10 |3 - 2| / 2 = 5; positives (0.3, 0.7): 0.04; non-positives (-0.2, 0): 0.17
    assert loss.item() == pytest.approx(5 + 0.04 + 0.17)
    loss.backward()
    polar = torch.tensor([2 * (0.3 - 0.5) / 2, 2 * (-0.2 + 0.5) / 2, 2 * 0.5 / 2, 2 * (0.7 - 0.5) / 2])
    torch.testing.assert_close(m.grad, 5.0 + polar)  # straight-through count gradient 10 sign(3 - 2) / 2 each
    assert math.isfinite(mask_budget_loss(torch.zeros(4), 2).item())  # an empty side adds 0, no NaN


# ---- the HSMs and their merge ------------------------------------------------------------------------------------
def test_step_zero_hsm_model_equals_base_model(tmp_path):
    net = pat_model(tmp_path)
    with torch.no_grad():
        with_hsm = net(input_ids=IDS).logits
        remove_hsms(net)
        plain = net(input_ids=IDS).logits
    torch.testing.assert_close(with_hsm, plain, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [(), ("method.identity_weight=0",)], ids=["identity", "no-identity"])
def test_merge_then_slice_equals_binary_masked_model(tmp_path, overrides):
    """HSMs (random low-rank parts and scales, LoRA, a mask with 20 positive values) with the mask binarised
    give the same logits as the model after the merge and the physical removal of the masked channels."""
    net = pat_model(tmp_path, *overrides)
    hsm = get_hsms(net)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(net):
            layer.lora_B.weight.normal_(0, 0.1)
        for site in hsm.sites.values():
            site.up.weight.normal_(0, 0.1)
            if site.scale.requires_grad:
                site.scale.uniform_(0.5, 1.5)
        hsm.mask.mask.copy_(torch.where(torch.randperm(32) < 20, 0.4, -0.3))
    hsm.mask.binary = True
    with torch.no_grad():
        reference = net(input_ids=IDS).logits
    kept = merge_hsms(net)
    assert len(kept) == 20 and get_hsms(net) is None
    apply_plan(net, PruningPlan(hidden=kept, rescale_rms=True))
    assert hidden_width(net) == 20 and net.model.embed_tokens.weight.shape[1] == 20
    assert blocks(net)[0].linear("self_attn.o_proj").lora_B.weight.shape[0] == 20
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=IDS).logits, reference, rtol=1e-5, atol=1e-5)


def test_tied_embedding_gets_a_mask_only_site_and_merges_exactly():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightmods.methods.pat import Pat, PatConfig
    from lightmods.models.families import family_of

    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, tie_word_embeddings=True,
    ))  # fmt: skip
    Pat(PatConfig(hsm_rank=8, rank=4)).prepare(net, family_of(net))
    hsm = get_hsms(net)
    assert hsm.sites["embed"].rank == 0 and not hsm.sites["embed"].scale.requires_grad
    with torch.no_grad():
        for site in hsm.sites.values():
            if site.rank:
                site.up.weight.normal_(0, 0.1)
        hsm.mask.mask.copy_(torch.where(torch.arange(32) % 4 == 0, -0.3, 0.4))
    hsm.mask.binary = True
    net.eval()
    with torch.no_grad():
        reference = net(input_ids=IDS % 300).logits
    apply_plan(net, PruningPlan(hidden=merge_hsms(net), rescale_rms=True))
    assert net.lm_head.weight is net.model.embed_tokens.weight and net.lm_head.in_features == 24
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=IDS % 300).logits, reference, rtol=1e-5, atol=1e-5)


# ---- end to end --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run, shared by the end-to-end and resume checks."""
    out = tmp_path_factory.mktemp("pat")
    from tests.conftest import FAST

    cfg = compose_run([*FAST, *PAT], out / "run")
    train(cfg)
    return Path(cfg.paths.output_dir)


def test_trains_merges_and_reports(straight):
    s = read(straight, "summary.json")
    plan = read(straight, "export/pruning_plan.json")
    assert s["status"] == "completed" and s["global_step"] == 16 and s["merged_at_step"] == 12
    assert s["hidden_before"] == 32 and s["hidden_target"] == 24 and s["hidden_after"] == len(plan["hidden"]) < 32
    assert plan["rescale_rms"] is True and not plan["heads"] and not plan["neurons"]
    assert s["params_after"] < s["params_before"] and s["compression_ratio_params"] == round(s["params_before"] / s["params_after"], 4)
    assert s["flops_per_sample_after"] < s["flops_per_sample_before"]
    assert s["inference_samples_per_s_before"] > 0 and s["inference_samples_per_s_after"] > 0 and s["speedup_inference"] > 0
    assert s["kv_cache_bytes_per_token_before"] == s["kv_cache_bytes_per_token_after"] > 0  # key/value widths stay
    header = (straight / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_identity", "train/loss_mask", "train/loss_task", "train/pat_kept"} <= set(header)
    ckpt = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lightmods"]["plan"] == plan and not any("pat_hsm" in k for k in ckpt["state_dict"])
    reloaded = load_export(straight / "export")
    trained = load_checkpoint_model(straight / "checkpoints" / "last.ckpt").eval()
    assert hidden_width(reloaded) == s["hidden_after"] and get_hsms(reloaded) is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, trained(input_ids=IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("crash_epoch,ckpt_step", [(2, 8), (3, 12)], ids=["mid-schedule", "after-merge"])
def test_resume_is_exact(straight, run_cfg, monkeypatch, crash_epoch, ckpt_step):
    last = crash_at_epoch(monkeypatch, run_cfg(*PAT), crash_epoch)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == ckpt_step and (ckpt["lightmods"]["plan"] is None) == (ckpt_step < 12)
    if ckpt_step < 12:
        assert int(ckpt["state_dict"]["model.pat_hsm.mask.step"]) == ckpt_step - 1  # the last forward's step
    resumed = run_cfg(*PAT, f"ckpt_path={last}")
    train(resumed)
    b = Path(resumed.paths.output_dir)
    assert_same_run(straight, b)


def test_merge_step_and_merge_when_training_stops_early(run_cfg):
    from types import SimpleNamespace

    from lightmods.callbacks.pat import PatMerge
    from lightmods.methods.pat import PatConfig

    fake = SimpleNamespace(estimated_stepping_batches=16)
    assert PatMerge(PatConfig(merge_at="end")).merge_step(fake) == 16  # the last optimizer step
    assert PatMerge(PatConfig(merge_at="schedule", mask_steps=40)).merge_step(fake) == 40
    cfg = run_cfg(*PAT, "method.mask_steps=100", "trainer.max_epochs=2")  # the schedule outlasts the run
    train(cfg)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    assert s["merged_at_step"] == 8 == s["global_step"] and s["hidden_after"] == len(read(out, "export/pruning_plan.json")["hidden"])
    assert get_hsms(load_export(out / "export")) is None


# ---- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,key",
    [
        ("method.mask_steps=1", "method.mask_steps"),
        ("method.merge_at=later", "method.merge_at"),
        ("method.prune_ratio=1.5", "method.prune_ratio"),
        ("method.hsm_rank=0", "method.hsm_rank"),
        ("method.identity_weight=-1", "method.identity_weight"),
        ("method.hidden_keep=32", "method.hidden_keep"),
    ],
)
def test_bad_configs_fail_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pat_model(tmp_path, override)


def test_post_layernorm_encoders_are_refused(tmp_path):
    plain = OmegaConf.to_container(compose_run(["model=tiny", "method=pat"], tmp_path), resolve=True)
    with pytest.raises(ConfigError, match=r"method=pat is not accepted with model_type='bert'.*LayerNorm"):
        rebuild_model(plain)


def test_summary_counts_hsms_as_adapters(tmp_path):
    from tests.test_peft import build

    net, m, _ = build("tiny_llama", "pat", tmp_path, "method.hsm_rank=8", "method.rank=4")
    s = m.summary(net)
    hsm_params = sum(p.numel() for p in get_hsms(net).parameters())
    assert s["params_hsm"] == hsm_params == 5 * (2 * 32 * 8 + 32) + 32  # 5 sites (embedding, 2 x 2 layers), the mask
    assert s["params_total"] == sum(p.numel() for p in net.parameters()) and s["hidden_target"] == 24
    remove_hsms(net)
    assert m.summary(net)["params_by_role"]["backbone"] == s["params_by_role"]["backbone"]
