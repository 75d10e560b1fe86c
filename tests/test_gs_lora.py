"""GS-LoRA / GS-LoRA++: the group lasso and its warm-up, zero groups and their removal from the export, the
bounded forgetting loss, merge + re-initialisation, the paired batches, per-task metrics, end-to-end forgetting
sequences on a tiny BERT (AG News) and a tiny ViT (synthetic images), and bad configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightmods.callbacks.forgetting import ForgettingBatchSampler, class_accuracy, h_mean, select_rows
from lightmods.config import validate
from lightmods.data.readers import read_local_split
from lightmods.data.tasks import get_task
from lightmods.errors import ConfigError
from lightmods.export import export_model, load_export
from lightmods.losses.group_lasso import (
    adapter_groups,
    block_of,
    drop_zero_groups,
    group_lasso,
    group_lasso_term,
    group_report,
)
from lightmods.methods.gs_lora import TaskSchedule, forgetting_loss, merge_and_reinit, prototype_kl
from lightmods.peft import LoraLinear, adapter_layers, inject_adapters
from lightmods.run import train
from tests.conftest import SHARED, compose_run
from tests.test_peft import build

AG = SHARED / "data" / "backdoor" / "clean" / "ag"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Toy(nn.Module):
    """Two blocks with query/value linears, named like an encoder (``layer.<i>.query``)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(4, 3), "value": nn.Linear(4, 3)}) for _ in range(2))


def toy_with_lora() -> nn.Module:
    torch.manual_seed(0)
    model = Toy()
    inject_adapters(model, ["query", "value"], lambda lin: LoraLinear(lin, rank=2, alpha=2.0))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.copy_(torch.randn_like(layer.lora_B.weight))
    return model


def lora_params(model, name):
    layer = model.get_submodule(name)
    return layer.lora_A.weight, layer.lora_B.weight


# ---------------------------------------------------------------- the group lasso


def test_group_lasso_equals_the_formula_for_every_grouping():
    model = toy_with_lora()
    assert block_of("bert.encoder.layer.3.attention.self.query") == "bert.encoder.layer.3"
    assert block_of("vit.layers.0.attention.q_proj") == "vit.layers.0" and block_of("classifier") == "classifier"
    sq = {n: [float(w.detach().pow(2).sum()) for w in lora_params(model, n)] for n in ("layer.0.query", "layer.0.value", "layer.1.query", "layer.1.value")}
    expected = {
        "block": sum(math.sqrt(sum(sq[f"layer.{i}.query"]) + sum(sq[f"layer.{i}.value"])) for i in (0, 1)),
        "module": sum(math.sqrt(sum(v)) for v in sq.values()),
        "matrix": sum(math.sqrt(x) for v in sq.values() for x in v),
        "type": sum(math.sqrt(sum(sq[f"layer.0.{t}"]) + sum(sq[f"layer.1.{t}"])) for t in ("query", "value")),
    }
    sizes = {"block": 2, "module": 4, "matrix": 8, "type": 2}
    for grouping, value in expected.items():
        groups = adapter_groups(model, grouping)
        assert len(groups) == sizes[grouping]
        assert float(group_lasso(groups).detach()) == pytest.approx(value, rel=1e-6)
    assert set(adapter_groups(model, "type")) == {"query", "value"}


def test_group_lasso_gradient_is_w_over_the_group_norm_and_zero_groups_give_no_nan():
    model = toy_with_lora()
    group_lasso(adapter_groups(model, "block")).backward()
    a0, b0 = lora_params(model, "layer.0.query")
    norm = math.sqrt(sum(float(w.detach().pow(2).sum()) for n in ("layer.0.query", "layer.0.value") for w in lora_params(model, n)))
    torch.testing.assert_close(a0.grad, a0.detach() / norm)
    torch.testing.assert_close(b0.grad, b0.detach() / norm)
    fresh = Toy()
    inject_adapters(fresh, ["query", "value"], lambda lin: LoraLinear(lin, rank=2))  # B = 0: zero matrix groups
    loss = group_lasso(adapter_groups(fresh, "matrix"))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in fresh.named_parameters() if "lora_" in n)
    assert all(float(p.grad.abs().max()) == 0 for n, p in fresh.named_parameters() if "lora_B" in n)


def test_warm_up_before_the_penalty(tmp_path):
    term = group_lasso_term(0.01, warmup_steps=5)
    assert [term.weight_at(s) for s in (0, 4, 5, 100)] == [0.0, 0.0, 0.01, 0.01]
    rc = validate(compose_run(["model=tiny", "method=gs_lora", "method.tasks=[[0]]", "method.group_warmup=0.5"], tmp_path))
    from lightmods.methods.gs_lora import GsLoRA

    m = GsLoRA(rc.method)
    m.forget_classes = [[0], [1]]
    m.schedule = TaskSchedule(2, 20)
    group = next(t for t in m.loss_terms() if t.name == "group_lasso")
    # the warm-up restarts with every task: no penalty for the first half of each task's 10 steps
    assert [group.weight_at(s) for s in (0, 4, 5, 9, 10, 14, 15, 19)] == [0, 0, 1, 1, 0, 0, 1, 1]
    # so does the learning-rate schedule (a fresh optimizer per task in the official code)
    m.optim = rc.optim
    m.optim.scheduler, m.optim.warmup_ratio = "linear", 0.2
    f = m.lr_lambda(20)
    assert [round(f(s), 6) for s in (0, 1, 2, 9, 10, 11, 12, 19)] == [0.5, 1.0, 1.0, 0.125, 0.5, 1.0, 1.0, 0.125]


def test_zero_groups_are_reported_and_dropped_from_the_export(tmp_path):
    net, m, batch = build("tiny", "gs_lora", tmp_path, "method.zero_threshold=1e-6")
    names = [n for n, _ in adapter_layers(net)]
    with torch.no_grad():
        for name, layer in adapter_layers(net):
            if ".layer.0." in name:  # block 0's group: exactly zero
                layer.lora_A.weight.zero_()
            else:
                layer.lora_B.weight.normal_(0, 0.5)
    report = group_report(net, "block", 1e-6)
    assert report["groups"] == 2 and report["zero_groups"] == ["bert.encoder.layer.0"]
    assert report["groups_nonzero_frac"] == 0.5 and report["group_norms"]["bert.encoder.layer.0"] == 0
    net.eval()
    with torch.no_grad():
        expected = net(**batch).logits
    dropped = drop_zero_groups(net, "block", 1e-6)
    assert dropped == [n for n in names if ".layer.0." in n] and len(dropped) == 2
    assert [n for n, _ in adapter_layers(net)] == [n for n in names if ".layer.1." in n]
    out = export_model(net, tmp_path / "export", {"note": "unit test"}, m.family.head_modules, "gs_lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == [n for n in names if ".layer.1." in n]
    with torch.no_grad():
        torch.testing.assert_close(load_export(out)(**batch).logits, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the forgetting objective


def test_bounded_forgetting_loss_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.2, 0.1]], requires_grad=True)
    labels = torch.tensor([0, 2])
    ce = float(F.cross_entropy(logits.detach(), labels))
    assert float(forgetting_loss(logits, labels, 3.0).detach()) == pytest.approx(3.0 - ce)
    small = forgetting_loss(logits, labels, ce - 0.1)  # CE above the bound: no loss, no gradient
    assert float(small.detach()) == 0
    small.backward()
    assert float(logits.grad.abs().max()) == 0
    torch.testing.assert_close(prototype_kl(torch.zeros(2, 4), torch.zeros(2, 4)), torch.tensor(0.0))
    p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    kl = (F.softmax(q, -1) * (F.log_softmax(q, -1) - F.log_softmax(p, -1))).sum()
    assert float(prototype_kl(p, q)) == pytest.approx(float(kl))  # KL(softmax(prototype) || softmax(feature))


def test_task_terms_split_the_batch_by_the_step_task(tmp_path):
    net, m, batch = build("tiny", "gs_lora", tmp_path, "method.tasks=[[0],[1]]", "data=backdoor/ag")
    m.schedule = TaskSchedule(2, 10)
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    terms = {t.name: t for t in m.loss_terms()}
    assert set(terms) == {"retain", "forget", "group_lasso"} and terms["forget"].weight == 0.5

    class Step:
        model = net

        def __init__(self, step):
            self.global_step = step

    b = {"labels": labels}
    # task 0 (steps 0-4) forgets class 0; task 1 (steps 5-9) forgets class 1 (class 0 rows then count for neither)
    torch.testing.assert_close(terms["retain"](Step(0), b, logits), F.cross_entropy(logits[[1, 2, 3, 5]], labels[[1, 2, 3, 5]]))
    torch.testing.assert_close(terms["forget"](Step(0), b, logits), F.relu(4.0 - F.cross_entropy(logits[[0, 4]], labels[[0, 4]])))
    torch.testing.assert_close(terms["forget"](Step(7), b, logits), F.relu(4.0 - F.cross_entropy(logits[[1, 5]], labels[[1, 5]])))
    torch.testing.assert_close(terms["retain"](Step(7), b, logits), F.cross_entropy(logits[[0, 2, 3, 4]], labels[[0, 2, 3, 4]]))
    assert m.task_weight(0) == 0.0  # the plain task loss is replaced by the retained rows' cross-entropy


def test_merge_and_reinit_keeps_the_function(tmp_path):
    net, m, batch = build("tiny", "gs_lora", tmp_path)
    with torch.no_grad():
        for _, layer in adapter_layers(net):
            layer.lora_B.weight.normal_(0, 0.5)
    net.eval()
    before_a = {n: layer.lora_A.weight.detach().clone() for n, layer in adapter_layers(net)}
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in adapter_layers(net)}
    deltas = {n: layer.delta_weight().detach().clone() for n, layer in adapter_layers(net)}
    with torch.no_grad():
        expected = net(**batch).logits
        assert merge_and_reinit(net) == 4
        torch.testing.assert_close(net(**batch).logits, expected, atol=1e-6, rtol=1e-6)
    for n, layer in adapter_layers(net):
        assert not layer.merged and float(layer.lora_B.weight.detach().abs().max()) == 0
        assert not torch.equal(layer.lora_A.weight, before_a[n])  # a fresh A (Kaiming-uniform, a = sqrt(50))
        assert float(layer.lora_A.weight.detach().abs().max()) <= math.sqrt(6 / (51 * layer.in_features)) + 1e-7
        torch.testing.assert_close(layer.base_layer.weight, base[n] + deltas[n])


# ---------------------------------------------------------------- data: pools, batches, holdout


def test_paired_batches_follow_the_task_of_their_step():
    labels = [0, 1, 2, 3] * 10
    pools = []
    for t, (forget, retained) in enumerate((([0], [1, 2, 3]), ([1], [2, 3]))):
        pools.append((select_rows(labels, retained, None, 1.0, t, "r"), select_rows(labels, forget, 3, 1.0, t, "f")))
    assert len(pools[0][1]) == 3 and {labels[i] for i in pools[0][1]} == {0}

    class M:
        schedule = TaskSchedule(2, 8, accumulate=1)

    def two_epochs():
        sampler = ForgettingBatchSampler(pools, batch_size=4, forget_batch_size=2, seed=0, method=M)
        first = list(sampler)
        sampler.sampler.set_epoch(1)  # what Lightning calls at each epoch start
        return len(sampler), first + list(sampler)

    n, batches = two_epochs()
    assert n == math.ceil(30 / 4) and len(batches) == 16
    for b, rows in enumerate(batches[:8]):  # steps 0-3: task 0, steps 4-7: task 1 (the rest: past the end, task 1)
        retain, forget = rows[:4], rows[4:]
        assert len(forget) == 2 and {labels[i] for i in forget} == ({0} if b < 4 else {1})
        assert {labels[i] for i in retain} <= ({1, 2, 3} if b < 4 else {2, 3}) and len(set(retain)) == 4
    assert two_epochs()[1] == batches  # reproducible
    forget_rows = [i for rows in batches[:4] for i in rows[4:]]  # 3 shots cycle: every pass a shuffle of the 3
    assert sorted(forget_rows[:3]) == sorted(pools[0][1]) == sorted(forget_rows[3:6])
    with pytest.raises(ValueError, match="fewer than 50 shots"):
        select_rows(labels, [0], 50, 1.0, 0, "f")


def test_ag_news_holdout_split_is_fixed_stratified_and_disjoint():
    task = get_task("backdoor/ag")
    train_rows, val_rows = read_local_split(task, str(AG), "train"), read_local_split(task, str(AG), "validation")
    assert (len(train_rows), len(val_rows)) == (599, 400)
    assert not {r["idx"] for r in train_rows} & {r["idx"] for r in val_rows}
    counts = [sum(r["label"] == c for r in val_rows) for c in range(4)]
    assert counts == [round(0.4 * n) for n in (267, 274, 205, 253)]
    assert [r["idx"] for r in read_local_split(task, str(AG), "validation")] == [r["idx"] for r in val_rows]


def test_metric_formulas():
    counts = {"correct": [8, 0, 5, 9], "total": [10, 10, 5, 10]}
    assert class_accuracy(counts, [0, 2]) == pytest.approx(13 / 15) and class_accuracy({"correct": [0], "total": [0]}, [0]) is None
    assert h_mean(0.9, 0.0, 0.8) == pytest.approx(2 * 0.9 * 0.8 / 1.7)
    assert h_mean(0.5, 0.5, 0.0) == 0.0 and h_mean(None, 0.1, 0.2) is None


# ---------------------------------------------------------------- end to end


def test_two_task_sequence_on_text_end_to_end(run_cfg):
    cfg = run_cfg("data=backdoor/ag", "method=gs_lora", "method.tasks=[[world],[1]]", "method.prototype=true",
                  "method.proto_retain_weight=0.05", "trainer.max_steps=6", "trainer.max_epochs=10", "data.max_eval_samples=64")  # fmt: skip
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    tasks = [json.loads((out / "forgetting" / f"task_{t}.json").read_text()) for t in (0, 1)]
    assert [t["forget"] for t in tasks] == [["world"], ["sports"]] and tasks[1]["old_forgotten"] == ["world"]
    assert tasks[0]["retained"] == ["sports", "business", "sci_tech"] and tasks[1]["retained"] == ["business", "sci_tech"]
    assert [t["steps"] for t in tasks] == [[0, 3], [3, 6]] and all(t["complete"] for t in tasks)
    m = tasks[1]["metrics"]
    assert m["h_mean"] == pytest.approx(h_mean(m["acc_f_before"], m["acc_f_after"], m["acc_r_after"]), abs=1e-5)
    assert tasks[1]["metrics"]["acc_o_before"] == tasks[0]["metrics"]["acc_f_after"]  # merge + reinit: same function
    for key in ("val/accuracy", "val/task0/acc_f_after", "val/task1/acc_o_after", "val/task1/h_mean", "val/acc_forgotten", "val/acc_retained", "val/h_mean"):
        assert key in metrics, key
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora_groups"] == 2 and summary["grouping"] == "block" and len(summary["forgetting_tasks"]) == 2
    assert summary["params_by_role"]["head"]["trainable"] == 0  # LoRA alone trains, as the official code
    assert summary["forgetting_task_steps"] == [[0, 3], [3, 6]] and summary["global_step"] == 6
    csv = (out / "csv" / "metrics.csv").read_text()
    for name in ("train/loss_retain", "train/loss_forget", "train/loss_group_lasso", "train/loss_proto_forget", "train/loss_proto_retain", "forget/task1/h_mean"):
        assert name in csv, name
    assert json.loads((out / "forgetting" / "summary.json").read_text())["tasks"][1]["task"] == 1
    assert json.loads((out / "export" / "lightmods.json").read_text())["kind"] == "peft_lora"


def test_resume_in_the_middle_of_a_task_ends_as_an_uninterrupted_run(run_cfg):
    common = ["data=backdoor/ag", "method=gs_lora", "method.tasks=[[world],[1]]", "method.prototype=true", "trainer.max_steps=12",
              "trainer.max_epochs=10", "data.max_eval_samples=64"]  # fmt: skip
    full = run_cfg(*common)
    expected = train(full)
    ckpt = sorted((Path(full.paths.output_dir) / "checkpoints").glob("epoch00-*.ckpt"))[0]  # step 3 of task 0's 6
    assert int(ckpt.stem.split("step")[1]) < 6
    assert train(run_cfg(*common, f"ckpt_path={ckpt}")) == expected


def test_group_lasso_alone_on_the_run_task_and_every_group_zero_exports_a_plain_model(run_cfg):
    """``tasks: []``: LoRA + the group penalty on the task itself (head trained); here every group counts as zero."""
    cfg = run_cfg("method=gs_lora", "method.tasks=[]", "method.train_head=true", "method.group_weight=0.1", "method.zero_threshold=1e9",
                  "trainer.max_steps=2")  # fmt: skip
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert set(metrics) == {"val/accuracy", "val/f1", "val/score"} and not (out / "forgetting").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora_groups_zero"] == summary["lora_groups"] == 2 and summary["lora_groups_nonzero_frac"] == 0
    assert len(summary["dropped_adapters"]) == 4 and summary["exported_adapters"] == 0
    assert summary["params_by_role"]["head"]["trainable"] > 0
    assert json.loads((out / "export" / "lightmods.json").read_text())["kind"] == "transformers"
    csv = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss_group_lasso" in csv and "train/loss_forget" not in csv


def test_forgetting_on_a_tiny_vit_with_synthetic_images(run_cfg, tmp_path):
    common = ["model=tiny_vit", "data=images/synthetic", "data.image.num_train=256", "data.image.num_val=128", "data.image.noise=0.3",
              "callbacks=none", "callbacks.progress_bar=false", "logger=none"]  # fmt: skip
    base = run_cfg(*common, "method=full_ft", "method.lr=5e-3", "trainer.max_epochs=10", fast=False)
    assert train(base)["val/accuracy"] > 0.9
    export = Path(base.paths.output_dir) / "export"
    cfg = run_cfg(*common, "method=gs_lora", f"model.name_or_path={export}", "model.init=pretrained", "method.tasks=[[horizontal],[3]]",
                  "method.lr=1e-2", "trainer.max_steps=40", "trainer.max_epochs=100", fast=False)  # fmt: skip
    metrics = train(cfg)
    assert metrics["val/task0/acc_f_before"] > 0.8 and metrics["val/acc_forgotten"] <= 0.1
    assert metrics["val/acc_retained"] >= metrics["val/acc_retained_original"] - 0.1
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert summary["lora_groups"] == 2 and summary["adapted_modules"] == 4  # q_proj, v_proj in each of 2 blocks
    assert json.loads((Path(cfg.paths.output_dir) / "export" / "adapter_config.json").read_text())["task_type"] is None
    # the export reloads as the forgetting model: its predictions on the validation images are the run's
    from lightmods.data.images import generate_image_rows

    rc = validate(cfg)
    rows = generate_image_rows(rc.data, 4, 32, 3)["validation"]
    model = load_export(Path(cfg.paths.output_dir) / "export")
    with torch.no_grad():
        preds = model(pixel_values=torch.stack([r["pixel_values"] for r in rows])).logits.argmax(-1).tolist()
    names = get_task("images/synthetic").label_names
    saved = [json.loads(line)["prediction"] for line in (Path(cfg.paths.output_dir) / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert [names[p] for p in preds] == saved


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "overrides,key,fragment",
    [
        (["method.tasks=[[cats]]"], "method.tasks[0]", "0..3 or world, sports, business, sci_tech"),
        (["method.tasks=[[0],[7]]"], "method.tasks[1]", "0..3"),
        (["method.bnd=-1"], "method.bnd", "> 0"),
        (["method.proto_bnd=0"], "method.proto_bnd", "> 0"),
        (["method.forget_weight=-0.5"], "method.forget_weight", ">= 0"),
        (["method.grouping=layer"], "method.grouping", "'block'"),
        (["method.group_warmup=1.5"], "method.group_warmup", "[0, 1)"),
        (["method.retain_ratio=0"], "method.retain_ratio", "(0, 1]"),
        (["method.forget_shots=0"], "method.forget_shots", "> 0"),
        (["method.tasks=[[0,1],[2,3]]"], "method.tasks", "at least one of"),
        (["method.tasks=[[0],[world]]"], "method.tasks", "forgotten once (world"),
        (["method.tasks=[[1],[1]]"], "method.tasks[1]", "already"),
        (["method.tasks=[[]]"], "method.tasks[0]", "non-empty"),
        (["trainer=ddp_cpu"], "trainer.strategy", "single-process"),
    ],
)
def test_bad_configs_fail_early_naming_key_value_and_accepted(overrides, key, fragment, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(compose_run(["model=tiny", "data=backdoor/ag", "method=gs_lora", *overrides], tmp_path))
    msg = str(e.value)
    assert key in msg and fragment in msg, msg


def test_a_regression_task_or_a_mismatched_model_is_refused(tmp_path, run_cfg):
    with pytest.raises(ConfigError, match="method.name='gs_lora'.*classification"):
        validate(compose_run(["model=tiny", "data=glue/stsb", "method=gs_lora"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.arch.model_type='bert'.*image classifier"):
        train(run_cfg("data=images/synthetic", "method=lora"))
    with pytest.raises(ConfigError, match=r"model.tokenizer=None.*text task"):
        train(run_cfg("model=tiny_vit", "method=lora"))
