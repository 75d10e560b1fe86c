"""COST-EFF on MiniLM-L6 + SST-2 against its fine-tuned teacher: parameters, FLOPs, accuracy and measured
wall-clock speed of early exit.

    python experiments/bench/cost_eff.py [--teacher-epochs 3] [--epochs 18] [--steps N] [--max-train-samples N]
        [--augment-spans N] [--threads 1] [--reuse] [--runs DIR] [--out experiments/bench/results/cost_eff.md]
    python experiments/bench/cost_eff.py --runs DIR --compare RUN,RUN,... --out TABLE.md

Runs the two commands of ``conf/experiment/cost_eff_sst2.yaml`` (teacher: ``method=full_ft``; then
``experiment=cost_eff_sst2 method.teacher=<teacher>/export``) as ``python train.py`` processes, then, in this
process, times both exported models on the SST-2 dev set in alternating rounds: the teacher's plain forward,
the slender model at full depth, and per-sample early exit at the selected and the largest threshold, at
batch size 1 (latency, as the paper evaluates) and at the evaluation batch size. FLOPs are the analytic
counts of ``lightmods.exits.flops`` (matmuls, actual token lengths). Writes a markdown table and an
accuracy-vs-FLOPs plot (``cost_eff.png``, matplotlib) next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightmods.exits import early_exit_forward, get_exits  # noqa: E402
from lightmods.export import load_export  # noqa: E402

DATA = "../shared/data/glue/SST-2"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def run(name: str, args, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    cmd = [
        sys.executable, str(ROOT / "train.py"), *overrides, f"seed={args.seed}", "callbacks.progress_bar=false",
        "callbacks.checkpoint.save_top_k=0", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    if args.max_train_samples:
        cmd.append(f"data.max_train_samples={args.max_train_samples}")
    print("$", " ".join(cmd[1:]), flush=True)
    done = run_dir / "summary.json"
    if args.reuse and done.exists() and json.loads(done.read_text()).get("status") == "completed":
        print("  reusing the finished run in", run_dir, flush=True)
    else:
        started = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
        print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    result = {"dir": run_dir, "cmd": " ".join(["python", "train.py", *cmd[2:]])}
    for f in ("summary", "metrics", "exit_curve"):
        path = run_dir / f"{f}.json"
        result[f] = json.loads(path.read_text()) if path.exists() else None
    return result


def dev_batches(batch_size: int, limit: int | None) -> list[dict]:
    """SST-2 dev rows tokenised as the runs do (the runs' cache), padded per batch."""
    from hydra import compose, initialize_config_dir

    from lightmods.config import register_schemas, validate
    from lightmods.data.datamodule import TextClassificationDataModule
    from lightmods.data.tasks import get_task
    from lightmods.models import build_tokenizer

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["model=minilm", "data=glue/sst2", f"data.data_dir={DATA}", "paths.output_dir=unused"],
        )
    rc = validate(cfg)
    dm = TextClassificationDataModule(
        get_task(rc.data.task), rc.data, build_tokenizer(rc.model), seed=0, tokenizer_id=rc.model.name_or_path
    )
    dm.setup("validate")
    ds = dm.datasets["validation"]
    idx = list(range(len(ds) if limit is None else min(limit, len(ds))))
    return [dm.collator([ds[i] for i in idx[j : j + batch_size]]) for j in range(0, len(idx), batch_size)]


def span_note(args) -> str:
    """What ``--augment-spans`` added to the COST-EFF run's training rows (the teacher trains without them)."""
    if not args.augment_spans:
        return ""
    from lightmods.config.schema import AugmentDataConfig
    from lightmods.data.augment import span_rows
    from lightmods.data.readers import read_local_split
    from lightmods.data.tasks import get_task

    task = get_task("glue/sst2")
    rows = read_local_split(task, DATA, "train")[: args.max_train_samples]
    n = len(span_rows(rows, task, AugmentDataConfig(spans=args.augment_spans), args.seed))
    return (
        f" and, for COST-EFF, {n:,} unlabelled span rows (`data.augment.spans={args.augment_spans}`: spans of 3 or more "
        "words of each sentence, learnt from the TA's predictions and hidden states only)"
    )


@torch.no_grad()
def time_rounds(fns: dict, batches: list[dict], rounds: int) -> dict:
    """Median samples/s of each function over alternating rounds."""
    out = {k: [] for k in fns}
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    for _ in range(rounds):
        for name, fn in fns.items():
            fn(batches[0])
            start = time.perf_counter()
            for b in batches:
                fn(b)
            out[name].append(n / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in out.items()}


def plot(curve: dict, teacher_acc: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    pts = sorted(curve["points"], key=lambda p: p["flops_relative"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [p["flops_relative"] for p in pts],
        [100 * p["accuracy"] for p in pts],
        "o-",
        label="COST-EFF, entropy early exit",
    )
    seen = set()
    for p in pts:  # one label per distinct point (thresholds where nobody exits early coincide)
        key = (round(p["flops_relative"], 4), round(p["accuracy"], 4))
        if key not in seen:
            seen.add(key)
            ax.annotate(
                f"τ={p['threshold']:g}",
                (p["flops_relative"], 100 * p["accuracy"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.plot([1.0], [100 * teacher_acc], "s", color="black", label="MiniLM-L6 fine-tuned (teacher)")
    ax.axhline(100 * teacher_acc - 2, color="grey", ls=":", lw=1, label="teacher - 2 points")
    ax.axvline(1 / 19, color="grey", ls="--", lw=1, label="1/19 FLOPs")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per sample, relative to the teacher (log)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("COST-EFF on MiniLM-L6, SST-2")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def compare(run_dirs: list[str], teacher_dir: Path, out: Path) -> None:
    """A table of finished COST-EFF runs side by side (what their commands changed, accuracy per exit, the
    selected early-exit point), against the teacher; no timing."""
    import yaml

    t_acc = json.loads((teacher_dir / "metrics.json").read_text())["val/accuracy"]
    lines = [
        "# COST-EFF on MiniLM-L6 + SST-2: schedules and training rows compared",
        "",
        "Made by `python " + " ".join(["experiments/bench/cost_eff.py", *sys.argv[1:]]) + "` from finished runs; "
        f"teacher `{teacher_dir}` at {100 * t_acc:.2f}. Each run's command: `python train.py` + its overrides below.",
        "",
        "| run | overrides | steps | params | full depth | per exit 1..L | selected τ | accuracy | vs teacher | avg exit layer | FLOPs vs teacher |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in map(Path, run_dirs):
        s = json.loads((d / "summary.json").read_text())
        if s.get("status") != "completed":
            sys.exit(f"--compare: {d} is not a completed run (summary.json status {s.get('status')!r})")
        curve = json.loads((d / "exit_curve.json").read_text())
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        shown = [o for o in overrides if not o.startswith(("method.teacher=", "callbacks.", "hydra.", "ckpt_path="))]
        full = max(curve["points"], key=lambda p: p["avg_exit_layer"])
        sel = curve["selected"]
        # an evaluation-only run (train=false ckpt_path=<a run's epoch checkpoint>) names the checkpoint instead
        steps = s["global_step"] or f"`{Path(s['resumed_from']).parent.parent.name}/{Path(s['resumed_from']).name}`"
        params = s.get("params_total_after") or s["params_final"]
        lines.append(
            f"| {d.parent.name}/{d.name} | `{' '.join(shown)}` | {steps} | {params / 1e6:.2f}M | "
            f"{100 * full['accuracy']:.2f} | {' / '.join(f'{100 * v:.1f}' for v in curve['accuracy_per_exit'].values())} | "
            f"{sel['threshold']:g} | {100 * sel['accuracy']:.2f} | {100 * (sel['accuracy'] - t_acc):+.2f} | "
            f"{sel['avg_exit_layer']:.2f} | 1/{1 / sel['flops_relative']:.1f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=18, help="COST-EFF epochs (all stages)")
    ap.add_argument("--steps", type=int, default=None, help="COST-EFF optimizer steps instead of --epochs")
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument(
        "--augment-spans", type=int, default=0,
        help="unlabelled span rows per training sentence for the COST-EFF run (data.augment.spans)",
    )  # fmt: skip
    ap.add_argument("--latency-samples", type=int, default=300, help="dev samples timed at batch size 1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--teacher-lr", default="5e-5")
    ap.add_argument("--extra", default="", help="more overrides for the COST-EFF run, space-separated")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in the output folder")
    ap.add_argument("--runs", default=str(ROOT / "logs" / "bench_cost_eff"))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "results" / "cost_eff.md"))
    ap.add_argument(
        "--compare", default=None,
        help="comma-separated finished COST-EFF run folders: only write their side-by-side table to --out",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    if args.compare:
        compare(args.compare.split(","), runs / "teacher", Path(args.out))
        return

    teacher = run(
        "teacher", args,
        ["model=minilm", "data=glue/sst2", f"data.data_dir={DATA}", "method=full_ft", f"method.lr={args.teacher_lr}", f"trainer.max_epochs={args.teacher_epochs}"],
        runs,
    )  # fmt: skip
    length = (
        [f"trainer.max_steps={args.steps}", "trainer.max_epochs=1000"]
        if args.steps
        else [f"trainer.max_epochs={args.epochs}"]
    )
    ce = run(
        "cost_eff",
        args,
        [
            "experiment=cost_eff_sst2",
            f"method.teacher={runs / 'teacher' / 'export'}",
            *length,
            *([f"data.augment.spans={args.augment_spans}"] if args.augment_spans else []),
            *args.extra.split(),
        ],
        runs,
    )

    s, curve = ce["summary"], ce["exit_curve"]
    t_acc = teacher["metrics"]["val/accuracy"]
    t_model = load_export(runs / "teacher" / "export")
    s_model = load_export(runs / "cost_eff" / "export")
    t_params = sum(p.numel() for p in t_model.parameters())
    s_params = sum(p.numel() for p in s_model.parameters())
    points = {p["threshold"]: p for p in curve["points"]}
    sel = curve["selected"]
    top = max(points)
    full = points.get(0.0) or max(curve["points"], key=lambda p: p["avg_exit_layer"])

    heads = get_exits(s_model)
    heads.capture = False  # plain forward of the slender model: no exit heads

    def plain(m):
        return lambda b: m(**{k: b[k] for k in INPUTS if k in b})

    fns = {
        "teacher": plain(t_model),
        "full_depth": plain(s_model),
        "early_exit_selected": lambda b: early_exit_forward(s_model, b, sel["threshold"]),
        "early_exit_max": lambda b: early_exit_forward(s_model, b, top),
    }
    speed = {}
    for bs, limit in ((1, args.latency_samples), (curve["batch_size"], None)):
        print(f"timing at batch size {bs} ...", flush=True)
        speed[bs] = time_rounds(fns, dev_batches(bs, limit), args.rounds)

    bs_eval = curve["batch_size"]
    rows = [
        ("MiniLM-L6 fine-tuned (teacher)", t_params, 1.0, t_acc, None, "teacher"),
        (
            "COST-EFF, full depth (τ=0)",
            s_params,
            full["flops_relative"],
            full["accuracy"],
            full["avg_exit_layer"],
            "full_depth",
        ),
        (
            f"COST-EFF, early exit τ={sel['threshold']:g} (selected)",
            s_params,
            sel["flops_relative"],
            sel["accuracy"],
            sel["avg_exit_layer"],
            "early_exit_selected",
        ),
        (
            f"COST-EFF, early exit τ={top:g}",
            s_params,
            points[top]["flops_relative"],
            points[top]["accuracy"],
            points[top]["avg_exit_layer"],
            "early_exit_max",
        ),
    ]
    lines = [
        "# COST-EFF on MiniLM-L6 + SST-2",
        "",
        "Made by `python " + " ".join(["experiments/bench/cost_eff.py", *sys.argv[1:]]) + "`, i.e.:",
        "",
        "```bash",
        teacher["cmd"],
        ce["cmd"],
        "```",
        "",
        f"torch {torch.__version__}, {args.threads} CPU thread(s) on a shared 2-core machine; SST-2 train "
        f"{'(first ' + str(args.max_train_samples) + ' rows)' if args.max_train_samples else '(6,920 sentences)'}{span_note(args)}, dev 872 sentences; "
        f"COST-EFF {s['global_step']} optimizer steps, prune events after steps {s.get('prune_event_steps')}.",
        "",
        f"| model | parameters | params ratio | FLOPs/sample | FLOPs ratio | dev accuracy | vs teacher | avg exit layer | bs=1 samples/s | bs=1 speed-up | bs={bs_eval} samples/s | bs={bs_eval} speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    flops0 = curve["flops_original_per_sample"]
    for name, params, rel, acc, layer, key in rows:
        lines.append(
            f"| {name} | {params / 1e6:.2f}M | 1/{t_params / params:.1f} | {rel * flops0 / 1e6:.1f}M | 1/{1 / rel:.1f} | "
            f"{100 * acc:.2f} | {100 * (acc - t_acc):+.2f} | {'-' if layer is None else f'{layer:.2f}'} | "
            f"{speed[1][key]:.1f} | {speed[1][key] / speed[1]['teacher']:.2f}x | {speed[bs_eval][key]:.1f} | {speed[bs_eval][key] / speed[bs_eval]['teacher']:.2f}x |"
        )
    lines += [
        "",
        f"Slender model: {s['heads_kept_per_layer'][0]} heads and {s['neurons_kept_per_layer'][0]} FFN neurons per layer (of 12 and 1536), "
        f"word embedding of rank {s['embedding_rank']} (of 384), {heads.num_layers - heads.start} exits + the final classifier "
        f"({s_params:,} parameters incl. exits vs {t_params:,}). FLOPs: analytic matmul count at each dev sentence's length "
        f"(teacher {flops0 / 1e6:.1f}M per sample). Speed-ups are measured wall-clock against the teacher's plain forward, "
        f"median of {args.rounds} alternating rounds ({args.latency_samples} dev sentences at bs=1, all 872 at bs={bs_eval}).",
        "",
        "Threshold sweep (`exit_curve.json` of the run; samples/s measured in the run at "
        f"bs={bs_eval}; accuracy per exit at full depth: "
        + ", ".join(f"exit {k}: {100 * v:.1f}" for k, v in curve["accuracy_per_exit"].items())
        + "):",
        "",
        "| τ | accuracy | avg exit layer | FLOPs vs teacher | samples/s |",
        "|---|---|---|---|---|",
    ]
    for p in curve["points"]:
        lines.append(
            f"| {p['threshold']:g} | {100 * p['accuracy']:.2f} | {p['avg_exit_layer']:.2f} | 1/{1 / p['flops_relative']:.1f} | "
            f"{p['samples_per_s']:.1f} |"
            if p["samples_per_s"]
            else f"| {p['threshold']:g} | {100 * p['accuracy']:.2f} | {p['avg_exit_layer']:.2f} | 1/{1 / p['flops_relative']:.1f} | - |"
        )
    drop = 100 * (t_acc - sel["accuracy"])
    lines += [
        "",
        f"Targets (paper: 1/8 parameters, 1/19 FLOPs, ~96% of the score; here at most 2 points lost): parameters 1/{t_params / s_params:.1f} "
        f"({'met' if t_params / s_params >= 7.85 else 'not met'}: the paper's 13.9M of 109.5M is 1/7.9), FLOPs 1/{1 / sel['flops_relative']:.1f} "
        f"({'met' if 1 / sel['flops_relative'] >= 19 else 'not met'}), accuracy {drop:.2f} points below the teacher "
        f"({'met' if drop <= 2 else 'not met'}). The threshold is selected on the dev set itself (the fewest FLOPs within "
        f"{curve['tolerance']} of the slender model's full-depth accuracy), as the paper reports dev curves.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if plot(curve, t_acc, out.with_suffix(".png")):
        lines += ["", f"![accuracy vs FLOPs]({out.with_suffix('.png').name})"]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
