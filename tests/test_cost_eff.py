"""COST-EFF end to end on tiny models: a teacher trained here, the TA stage, iterative slenderization to the
targets, recovery, the exit curve, resume across a prune event, export; plus the stage arithmetic."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightmods.config import validate
from lightmods.config.schema import AugmentDataConfig
from lightmods.data.augment import span_rows
from lightmods.data.demo import generate_demo
from lightmods.data.tasks import get_task
from lightmods.errors import ConfigError
from lightmods.exits import get_exits
from lightmods.export import load_checkpoint_model, load_export
from lightmods.methods import build_method
from lightmods.methods.cost_eff import CostEffConfig, Stages, segment_lr
from lightmods.run import train
from lightmods.structure import blocks
from lightmods.structure.embedding import embedding_rank
from tests.conftest import FAST, assert_same_outputs_and_exits, compose_run, crash_at_epoch

# 64 rows / batch 16 = 4 steps per epoch, 4 epochs = 16 steps: TA steps 0-4 (frozen after step 5), prune
# events after steps 7 and 10 (4 -> 3 -> 2 heads), recovery to step 16.
CE = (
    "method=cost_eff", "method.lr=1e-3", "trainer.max_epochs=4", "method.target_heads=2", "method.target_ffn=16",
    "method.target_emb_rank=8", "method.taylor_batches=2", "exits.thresholds=[0.6,0.3,0.0]",
)  # fmt: skip


def training_token_ids(rc):
    """The encoded training split of a validated run config, and its tokenizer: what the vocabulary trimming
    counts tokens over."""
    from lightmods.data import TextClassificationDataModule
    from lightmods.models import build_tokenizer

    tok = build_tokenizer(rc.model)
    dm = TextClassificationDataModule(get_task(rc.data.task), rc.data, tok, seed=0)
    dm.setup()
    return dm.datasets["train"].features["input_ids"], tok


def read(run_dir, name: str) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny BERT fine-tuned on the demo task (method=full_ft): its export/ is the teacher."""
    out = tmp_path_factory.mktemp("teacher")
    train(compose_run([*FAST, "method=full_ft", "method.lr=1e-3", "trainer.max_epochs=2"], out))
    return out / "export"


def test_cost_eff_slenderizes_to_the_targets_end_to_end(run_cfg, teacher):
    cfg = run_cfg(*CE, f"method.teacher={teacher}")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    assert s["status"] == "completed" and s["global_step"] == 16
    assert s["stage_bounds"] == {
        "ta_rep": [0, 1],
        "ta_pred": [1, 5],
        "prune": [5, 10],
        "recover_rep": [10, 11],
        "recover_pred": [11, 16],
    }
    assert s["prune_event_steps"] == [7, 10] and s["ta_frozen_at_step"] == 5 and s["prune_events_done"] == 2
    assert "selected_step" not in s  # method.select=last: the last step's weights
    assert (
        s["heads_kept_per_layer"] == [2, 2]
        and s["neurons_kept_per_layer"] == [16, 16]
        and s["embedding_rank"] == 8
    )
    assert s["params_foundation_after"] < s["params_foundation_before"] < s["params_original"]
    assert s["params_total_after"] == s["params_final"]
    assert (
        s["flops_after"] < s["flops_before"]
        and 0 < s["flops_relative"] <= s["flops_relative_full_depth"] + 1e-9
    )
    assert s["inference_samples_per_s_original"] > 0 and s["speedup_wall_vs_original"] > 0
    csv = (out / "csv" / "metrics.csv").read_text()
    for key in (
        "train/loss_rep",
        "train/loss_pred",
        "train/loss_hard_exits",
        "val/accuracy_exit1",
        "val/accuracy_exit2",
    ):
        assert key in csv, key
    assert {
        "val/accuracy_exit1",
        "val/accuracy_exit2",
        "val/flops_relative",
        "val/accuracy_early_exit",
    } <= set(metrics)
    curve = read(out, "exit_curve.json")
    assert [p["threshold"] for p in curve["points"]] == [0.6, 0.3, 0.0]
    full = curve["points"][-1]
    assert full["avg_exit_layer"] == 2 and full["flops_relative"] == pytest.approx(
        s["flops_relative_full_depth"], abs=1e-6
    )
    assert full["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    # the slender model is what the checkpoint and the export hold; the export reloads with identical outputs
    plan = read(out, "export/pruning_plan.json")
    assert plan["embedding_rank"] == 8 and all(len(v) == 2 for v in plan["heads"].values())
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    reloaded = load_export(out / "export")
    assert [b.num_heads for b in blocks(reloaded)] == [2, 2] and embedding_rank(reloaded) == 8
    assert get_exits(reloaded) is not None and not hasattr(reloaded.bert.pooler.dense, "weight")
    ids = torch.randint(5, 1000, (4, 11), generator=torch.Generator().manual_seed(0))
    assert_same_outputs_and_exits(reloaded, trained, ids, 0.6)


def test_span_rows_are_distilled_alongside_the_labelled_ones(run_cfg, teacher):
    """``data.augment.spans``: every epoch runs over the labelled rows and their unlabelled spans; the losses
    stay finite whatever share of a batch is unlabelled (here about two thirds)."""
    cfg = run_cfg(*CE, f"method.teacher={teacher}", "trainer.max_epochs=1", "data.augment.spans=2")
    rows = generate_demo(2000, 600, 1234)["train"][:64]
    n_spans = len(span_rows(rows, get_task("demo"), AugmentDataConfig(spans=2), seed=42))
    assert n_spans > 64
    metrics = train(cfg)
    s = read(cfg.paths.output_dir, "summary.json")
    assert s["status"] == "completed" and s["global_step"] == -(-(64 + n_spans) // 16)
    assert s["heads_kept_per_layer"] == [2, 2] and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("method.emb_vocab=train",),
        ("method.emb_vocab=train", "method.emb_fallback=nearest", "method.emb_min_count=2"),
    ],
    ids=["all_vocab", "trimmed_vocab", "trimmed_nearest_min2"],
)
def test_resume_after_a_prune_event(run_cfg, teacher, monkeypatch, extra):
    """A checkpoint saved between the two prune events (TA frozen, one event done) resumes into the slender
    architecture with the TA restored from the checkpoint, and ends where an uninterrupted run ends."""
    straight = run_cfg(*CE, f"method.teacher={teacher}", *extra)
    train(straight)

    last = crash_at_epoch(monkeypatch, run_cfg(*CE, f"method.teacher={teacher}", *extra), 2)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 8
    assert ckpt["lightmods"]["plan"]["heads"] and "embedding_rank" in ckpt["lightmods"]["plan"]
    state = ckpt["callbacks"]["CostEffStages"]
    assert state["events_done"] == 1 and state["ta_taken"] and state["ta_state"]
    assert ("embedding_vocab" in ckpt["lightmods"]["plan"]) == bool(extra)
    resumed = run_cfg(*CE, f"method.teacher={teacher}", *extra, f"ckpt_path={last}")
    train(resumed)
    a, b = Path(straight.paths.output_dir), Path(resumed.paths.output_dir)
    plan = read(b, "export/pruning_plan.json")
    assert read(a, "export/pruning_plan.json") == plan
    if "method.emb_fallback=nearest" in extra:  # one kept id per token id, not all to [UNK]
        fallback, kept = plan["embedding_fallback"], set(plan["embedding_vocab"])
        assert isinstance(fallback, list) and set(fallback) <= kept and len(set(fallback) - {100}) > 1
        assert all(fallback[i] == i for i in kept)
        # emb_min_count=2: the tokens seen once in training lose their rows too, the others keep them
        counts = Counter(t for ids in training_token_ids(validate(straight))[0] for t in ids)
        once, often = {t for t, n in counts.items() if n == 1}, {t for t, n in counts.items() if n >= 2}
        assert once and not once & kept and often <= kept
    sb = read(b, "summary.json")
    assert sb["global_step"] == 16 and sb["prune_events_done"] == 2 and sb["heads_kept_per_layer"] == [2, 2]
    wa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def test_ta_init_teacher_starts_the_student_from_the_fine_tuned_weights(run_cfg, teacher):
    """``method.ta_init=teacher``: the backbone and classifier start as the teacher's (a run at a negligible
    learning rate ends there), the exits as initialised; the official ``pretrained`` start does not."""
    t = load_export(str(teacher)).state_dict()
    ends = {}
    for init in ("teacher", "pretrained"):
        cfg = run_cfg("method=cost_eff", f"method.teacher={teacher}", f"method.ta_init={init}", "method.lr=1e-12", "trainer.max_steps=2")
        train(cfg)
        ends[init] = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    shared = [k for k in t if f"model.{k}" in ends["teacher"]]
    assert any(".encoder." in k for k in shared) and any(k.startswith("classifier.") for k in shared)
    for k in shared:
        torch.testing.assert_close(ends["teacher"][f"model.{k}"], t[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.allclose(ends["pretrained"]["model.bert.encoder.layer.0.attention.self.query.weight"], t["bert.encoder.layer.0.attention.self.query.weight"])


def test_token_frequency_weights_the_embedding_svd(run_cfg, teacher, monkeypatch):
    """``method.emb_svd_weights=token_frequency``: every factorisation at a prune event is weighted by the
    training split's token counts (+1); the run ends at the target rank and its export reloads as usual."""
    import lightmods.callbacks.cost_eff as cb
    from lightmods.structure.embedding import token_weights

    calls = []
    real = cb.factorize_embedding

    def spy(model, rank, row_weights=None):
        calls.append((rank, row_weights))
        return real(model, rank, row_weights)

    monkeypatch.setattr(cb, "factorize_embedding", spy)
    cfg = run_cfg(*CE, f"method.teacher={teacher}", "method.emb_svd_weights=token_frequency")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert read(out, "summary.json")["embedding_rank"] == 8 and [r for r, _ in calls] == [20, 8]
    # counts + 1: every token at least 1, the [CLS] id of each of the 64 rows more
    assert all(w is not None and w.min() == 1 and w.max() >= 65 for _, w in calls)
    assert torch.equal(calls[0][1], calls[1][1])
    assert embedding_rank(load_export(out / "export")) == 8
    assert token_weights([[5, 5, 6]], 8).tolist() == [1, 1, 1, 1, 1, 3, 2, 1]


def test_emb_vocab_train_keeps_the_rows_of_the_training_tokens(run_cfg, teacher):
    """``method.emb_vocab=train``: from the first prune event the word embedding keeps the rows of the tokens the
    training split uses (and the special tokens), factorised to the target rank; every other id reads [UNK]'s
    row. The plan in the checkpoint and the export holds the kept ids, and the export reloads identically."""
    from lightmods.structure.embedding import embedding_vocab, kept_token_ids

    cfg = run_cfg(*CE, f"method.teacher={teacher}", "method.emb_vocab=train", "method.emb_svd_weights=token_frequency")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    ids, tok = training_token_ids(validate(cfg))
    kept = kept_token_ids(ids, set(tok.all_special_ids), len(tok)).tolist()
    assert s["embedding_vocab_kept"] == len(kept) < len(tok) and s["embedding_rank"] == 8
    plan = read(out, "export/pruning_plan.json")
    assert plan["embedding_vocab"] == kept and plan["embedding_fallback"] == tok.unk_token_id
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    reloaded = load_export(out / "export")
    assert embedding_vocab(reloaded) == len(kept) and embedding_rank(reloaded) == 8
    ids = torch.randint(5, len(tok), (4, 11), generator=torch.Generator().manual_seed(0))
    assert_same_outputs_and_exits(reloaded, trained, ids, 0.6)
    unseen = next(i for i in range(len(tok)) if i not in set(kept))
    as_unk = torch.tensor([[tok.cls_token_id, tok.unk_token_id, tok.sep_token_id]])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=torch.tensor([[tok.cls_token_id, unseen, tok.sep_token_id]])).logits,
            reloaded(input_ids=as_unk).logits, rtol=0, atol=0,
        )  # fmt: skip
    emb = reloaded.bert.embeddings.word_embeddings
    assert emb.inner.embed.weight.shape == (len(kept), 8)  # what params_total_after counts: the kept rows only
    assert s["params_total_after"] == sum(p.numel() for p in trained.parameters())


def test_select_exits_mean_ends_on_the_best_post_prune_validation(run_cfg, teacher, monkeypatch):
    """``method.select=exits_mean`` (the official choice): of the validations after the prune stage (epochs 2
    and 3, steps 12 and 16), the one with the best accuracy averaged over the exits gives the weights that are
    evaluated and exported; ``last.ckpt`` keeps the last step's. Exit 1's logged accuracy is overridden per
    epoch (the tiny model's are all equal) so that the earlier post-prune validation is the better one."""
    import csv as csv_module

    from lightmods.exits.evaluation import ExitsEvaluation

    real = ExitsEvaluation.on_validation_epoch_end
    forced = {0: 0.99, 1: 0.99, 2: 0.9, 3: 0.1}  # before the prune stage ends, a better score must not count

    def forcing(self, trainer, pl_module):
        real(self, trainer, pl_module)
        if not trainer.sanity_checking:
            pl_module.log("val/accuracy_exit1", forced[trainer.current_epoch], add_dataloader_idx=False)

    monkeypatch.setattr(ExitsEvaluation, "on_validation_epoch_end", forcing)
    cfg = run_cfg(*CE, f"method.teacher={teacher}", "method.select=exits_mean", "callbacks.checkpoint.save_top_k=-1")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    rows = [r for r in csv_module.DictReader(open(out / "csv" / "metrics.csv")) if r.get("val/accuracy_exit1") and r.get("epoch")]
    exit1 = [float(r["val/accuracy_exit1"]) for r in rows]  # the forced value averaged with the measured one
    assert len(exit1) == 4 and exit1[0] > exit1[2] > exit1[3]
    assert s["selected_epoch"] == 2 and s["selected_step"] == 12
    assert s["selected_exits_mean"] == pytest.approx((exit1[2] + float(rows[2]["val/accuracy_exit2"])) / 2, abs=1e-6)
    chosen = torch.load(next((out / "checkpoints").glob("epoch02-*.ckpt")), weights_only=True)["state_dict"]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    exported = load_export(out / "export").state_dict()
    for k, v in exported.items():
        torch.testing.assert_close(v, chosen[f"model.{k}"], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, last["state_dict"][f"model.{k}"]) for k, v in exported.items())
    assert last["global_step"] == 16 and last["callbacks"]["CostEffStages"]["best"]["step"] == 12


def test_without_a_teacher_the_ta_learns_from_labels_and_teaches(run_cfg):
    cfg = run_cfg(*CE)
    train(cfg)
    s = read(cfg.paths.output_dir, "summary.json")
    assert s["ta_frozen_at_step"] == 5 and s["heads_kept_per_layer"] == [2, 2]
    assert s["inference_samples_per_s_original"] is None  # no original model to time
    csv = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    assert "train/loss_hard_exits" in csv and "train/loss_rep" in csv  # labels first, the TA later


# ---- stages and schedule ---------------------------------------------------------------------------------
def test_stages_and_learning_rate_segments():
    c = CostEffConfig(
        ta_rep_frac=0.1,
        ta_pred_frac=0.2,
        prune_frac=0.4,
        recover_rep_frac=0.1,
        lr_restore=0.5,
        prune_lr_scale=0.5,
    )
    st = Stages.build(c, 100, 4)
    assert st.bounds == {
        "ta_rep": (0, 10),
        "ta_pred": (10, 30),
        "prune": (30, 70),
        "recover_rep": (70, 80),
        "recover_pred": (80, 100),
    }
    assert st.events == [40, 50, 60, 70] and st.ta_end == 30
    assert [st.stage(s) for s in (0, 10, 29, 30, 69, 70, 80, 99)] == [
        "ta_rep",
        "ta_pred",
        "ta_pred",
        "prune",
        "prune",
        "recover_rep",
        "recover_pred",
        "recover_pred",
    ]
    assert st.period(45) == (1, 40, 50) and st.period(30) == (0, 30, 40)
    segs = st.segments(c)
    assert segs[2:6] == [(30, 40, 0.5), (40, 50, 0.75), (50, 60, 1.125), (60, 70, 1.6875)]
    f = segment_lr(segs, 0.1)
    assert f(0) == pytest.approx(1.0) and f(9) == pytest.approx(1 / 9)  # 1-step warm-up, linear decay
    assert f(40) == pytest.approx(0.75) and f(49) == pytest.approx(0.75 / 9)
    assert f(10) == pytest.approx(0.5) and f(11) == pytest.approx(1.0)  # 2-step warm-up of the 20-step stage
    assert segs[6:] == [(70, 80, 1.0), (80, 100, 1.0)]
    scaled = st.segments(CostEffConfig(**{**vars(c), "recover_lr_scale": 0.25}))
    assert scaled[:6] == segs[:6] and scaled[6:] == [(70, 80, 0.25), (80, 100, 0.25)]


def test_prune_events_follow_the_configured_schedule():
    """The callback's per-event sizes follow ``method.prune_schedule`` for heads, FFN and embedding rank."""
    from types import SimpleNamespace

    from lightmods.callbacks.cost_eff import CostEffStages

    full = {"heads": 12, "ffn": 1536, "hidden": 384}
    sizes = {}
    for schedule in ("linear", "geometric"):
        c = CostEffConfig(target_heads=2, target_ffn=128, target_emb_rank=48, prune_schedule=schedule)
        cb = CostEffStages(SimpleNamespace(config=c, full_sizes=full))
        sizes[schedule] = [cb.targets(e, 10) for e in (1, 9, 10)]
    assert sizes["linear"] == [(11, 1395, 350), (3, 269, 82), (2, 128, 48)]
    assert sizes["geometric"] == [(10, 1198, 312), (2, 164, 59), (2, 128, 48)]


def test_objective_per_stage(tmp_path):
    rc = validate(compose_run(["method=cost_eff", "model=tiny", "method.target_heads=2"], tmp_path))
    method = build_method(rc.method)
    method.full_sizes = {"heads": 4, "ffn": 64, "hidden": 32}
    method.stages_for(100)
    assert method._mode(50) == "hard" and method.task_weight(50) == 1.0  # no teacher: labels everywhere
    method.teacher = torch.nn.Identity()
    modes = [method._mode(s) for s in (0, 10, 30, 40, 41, 45, 55, 56, 60, 69, 70)]
    # ta_rep [0, 5), ta_pred [5, 30), prune [30, 60) in 2 periods of 15 steps whose first 70% (10.5 steps)
    # distil hidden states only, recover_rep [60, 70), recover_pred [70, 100)
    assert modes == [
        "rep",
        "ta",
        "rep",
        "rep",
        "pred_rep",
        "rep",
        "rep",
        "pred_rep",
        "rep",
        "rep",
        "pred_rep",
    ]
    assert method.task_weight(10) == 0.5 and method.task_weight(0) == 0.0 and method.task_weight(90) == 0.0


def test_config_errors(run_cfg, tmp_path):
    with pytest.raises(ConfigError, match="method.prune_frac"):
        validate(compose_run(["method=cost_eff", "method.prune_frac=0.9"], tmp_path))
    with pytest.raises(ConfigError, match="method.ta_init.*'pretrained' when method.teacher is null"):
        validate(compose_run(["method=cost_eff", "method.ta_init=teacher"], tmp_path))
    with pytest.raises(ConfigError, match="method.ta_init.*one of 'pretrained', 'teacher'"):
        validate(compose_run(["method=cost_eff", "method.ta_init=finetuned"], tmp_path))
    with pytest.raises(ConfigError, match="method.prune_schedule.*one of 'linear', 'geometric'"):
        validate(compose_run(["method=cost_eff", "method.prune_schedule=cubic"], tmp_path))
    with pytest.raises(ConfigError, match="method.emb_svd_weights.*one of 'none', 'token_frequency'"):
        validate(compose_run(["method=cost_eff", "method.emb_svd_weights=idf"], tmp_path))
    with pytest.raises(ConfigError, match="method.select.*one of 'last', 'exits_mean'"):
        validate(compose_run(["method=cost_eff", "method.select=best"], tmp_path))
    with pytest.raises(ConfigError, match="method.emb_vocab.*one of 'all', 'train'"):
        validate(compose_run(["method=cost_eff", "method.emb_vocab=dev"], tmp_path))
    with pytest.raises(ConfigError, match="method.emb_fallback.*one of 'unk', 'nearest'"):
        validate(compose_run(["method=cost_eff", "method.emb_vocab=train", "method.emb_fallback=pad"], tmp_path))
    with pytest.raises(ConfigError, match="method.emb_fallback='nearest'.*when method.emb_vocab is 'all'"):
        validate(compose_run(["method=cost_eff", "method.emb_fallback=nearest"], tmp_path))
    with pytest.raises(ConfigError, match="method.emb_min_count=0.*> 0"):
        validate(compose_run(["method=cost_eff", "method.emb_vocab=train", "method.emb_min_count=0"], tmp_path))
    with pytest.raises(ConfigError, match="method.emb_min_count=2.*when method.emb_vocab is 'all'"):
        validate(compose_run(["method=cost_eff", "method.emb_min_count=2"], tmp_path))
    with pytest.raises(ConfigError, match="method.recover_lr_scale"):
        validate(compose_run(["method=cost_eff", "method.recover_lr_scale=0"], tmp_path))
    cfg = run_cfg("method=cost_eff", "method.target_heads=9", "method.target_ffn=16", "trainer.max_steps=2")
    train(cfg)  # a target above the model's size keeps that part whole
    s = read(cfg.paths.output_dir, "summary.json")
    assert s["heads_kept_per_layer"] == [4, 4] and s["neurons_kept_per_layer"] == [16, 16]
    with pytest.raises(ConfigError, match="differs from the student"):
        teacher_dir = tmp_path / "t"
        train(
            compose_run(
                [*FAST, "method=full_ft", "model.arch.num_hidden_layers=1", "trainer.max_steps=1"],
                teacher_dir,
            )
        )
        train(run_cfg("method=cost_eff", f"method.teacher={teacher_dir / 'export'}"))


def test_bench_embedding_factorization_tables_plain_and_weighted_ranks(teacher, tmp_path, monkeypatch):
    """At the full rank (the hidden size) both factorisations reproduce the teacher's accuracy; lower ranks give
    one row each; a folder without lightmods.json is refused naming the flag."""
    from experiments.bench import embedding_factorization as bench

    out = tmp_path / "ef.md"
    monkeypatch.setattr("sys.argv", ["x", "--teacher", str(teacher), "--ranks", "4,32", "--out", str(out)])
    bench.main()
    text = out.read_text()
    full = float(text.split("accuracy ")[1].split(" ")[0])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 4 |") or line.startswith("| 32 |")]
    assert len(rows) == 2 and float(rows[1][2]) == full and float(rows[1][3]) == full
    trimmed_full = text.split("unfactorised those score ")[1].split(";")[0].split(" and ")
    # full rank over the kept rows: the trimmed model itself, with either fallback
    assert [float(rows[1][6]), float(rows[1][7].rstrip(" |"))] == [float(a) for a in trimmed_full]

    def kept(text: str) -> int:
        return int(text.split("keep only the rows of the ")[1].split(" token ids")[0].replace(",", ""))

    monkeypatch.setattr("sys.argv", ["x", "--teacher", str(teacher), "--ranks", "4", "--min-count", "2", "--out", str(out)])
    bench.main()
    assert "`method.emb_min_count=2`" in out.read_text() and kept(out.read_text()) < kept(text)
    for argv, message in (
        (["--teacher", str(tmp_path)], "--teacher=.*accepted: the export/ folder"),
        (["--teacher", str(teacher), "--min-count", "0"], "--min-count=0.*>= 1"),
    ):
        monkeypatch.setattr("sys.argv", ["x", *argv])
        with pytest.raises(SystemExit, match=message):
            bench.main()


def test_bench_compare_tables_finished_runs_and_refuses_unfinished(tmp_path, monkeypatch):
    from experiments.bench.cost_eff import compare

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.json").write_text(json.dumps({"val/accuracy": 0.88}))
    point = {"threshold": 0.5, "accuracy": 0.83, "avg_exit_layer": 2.5, "flops_relative": 0.05}
    for name, status in (("long", "completed"), ("crashed", "failed")):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"status": status, "global_step": 3906, "params_total_after": 2_881_644}))
        full = {**point, "threshold": 0.0, "accuracy": 0.84, "avg_exit_layer": 6.0, "flops_relative": 0.11}
        curve = {"points": [point, full], "selected": point, "accuracy_per_exit": {"1": 0.76, "2": 0.84}}
        (d / "exit_curve.json").write_text(json.dumps(curve))
        (d / ".hydra" / "overrides.yaml").write_text(
            "- experiment=cost_eff_sst2\n- method.teacher=t/export\n- trainer.max_epochs=18\n- callbacks.progress_bar=false\n"
        )
    monkeypatch.setattr("sys.argv", ["cost_eff.py"])
    out = tmp_path / "table.md"
    compare([str(tmp_path / "long")], tmp_path / "teacher", out)
    row = out.read_text().splitlines()[-1]
    assert row == (
        f"| {tmp_path.name}/long | `experiment=cost_eff_sst2 trainer.max_epochs=18` | 3906 | 2.88M | 84.00 | 76.0 / 84.0 | "
        "0.5 | 83.00 | -5.00 | 2.50 | 1/20.0 |"
    )
    # an evaluation-only run of an epoch checkpoint: named by the checkpoint, its size from params_final
    d = tmp_path / "epoch15"
    (d / ".hydra").mkdir(parents=True)
    (d / "exit_curve.json").write_text((tmp_path / "long" / "exit_curve.json").read_text())
    ckpt = str(tmp_path / "long" / "checkpoints" / "epoch15-step003472.ckpt")
    (d / "summary.json").write_text(json.dumps({"status": "completed", "global_step": 0, "params_final": 2_881_644, "resumed_from": ckpt}))
    (d / ".hydra" / "overrides.yaml").write_text(f"- experiment=cost_eff_sst2\n- train=false\n- ckpt_path={ckpt}\n")
    compare([str(d)], tmp_path / "teacher", out)
    assert out.read_text().splitlines()[-1].startswith(
        f"| {tmp_path.name}/epoch15 | `experiment=cost_eff_sst2 train=false` | `long/epoch15-step003472.ckpt` | 2.88M | 84.00 |"
    )
    with pytest.raises(SystemExit, match="not a completed run"):
        compare([str(tmp_path / "crashed")], tmp_path / "teacher", out)
