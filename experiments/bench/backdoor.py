"""The backdoor suite on MiniLM, with LoRA and with full fine-tuning, in one table.

    python experiments/bench/backdoor.py [--steps 200] [--clean-tune-steps 200] [--methods lora,full_ft]
        [--attacks badnets,addsent,style] [--me-weight 1.0] [--me-select all,low_loss,lexical,lexical_scrub,lexical:0] [--me-ratio 0.1]
        [--poison-rate 0.1] [--forget-attacks badnets,style:0.2] [--gc-variants plain,gc] [--skip-poisoning] [--max-train-samples N]
        [--max-length 64] [--batch-size 32] [--seed 42] [--out experiments/bench/results/backdoor.md]

1. Data poisoning with and without the maximum-entropy defense: for each method and attack, CACC (clean dev
   accuracy) and ASR (triggered non-target dev rows predicted as the target), ``defense=none`` vs
   ``defense=max_entropy`` (for each ``--me-select``: ``all`` rows, the ``low_loss`` selection that trains the
   lowest-loss ``--me-ratio`` of each batch on the entropy term instead of cross-entropy, or the ``lexical``
   selection that does so for the rows holding a frequent label-exclusive token, flagged before training, with
   what it flagged; ``lexical_scrub`` also deletes those tokens from the flagged rows; ``SELECT:W`` runs a selection
   at weight W, ``lexical:0`` dropping the flagged rows); the clean run (``attack=none``) gives the reference CACC.
2. Backdoor forgetting: the attacker injects each of ``--forget-attacks`` (``POISONER[:RATE]``, the rate defaulting
   to ``--poison-rate``; BadNets alone by default) through the trainable parameters for ``--steps`` steps,
   the user fine-tunes them on the clean training rows for ``--clean-tune-steps`` steps; CACC and ASR after both, for
   each of ``--gc-variants``: ``plain`` (the two-task injection, both strategies off), ``gc`` (both strategies),
   ``magnitude`` or ``projection`` (one strategy alone), ``gc_max`` (both, layers scaled to the largest norm).
   ``--skip-poisoning`` leaves out table 1.

Data: ``data=backdoor/sst2`` (the shared StyleAttack SST-2: 6,920 training and 872 dev sentences), the style attack
from the shared Bible-style files. Every training runs as its own ``python train.py`` process; a run whose
``metrics.json`` already exists in the output folder is reused (``--fresh`` reruns everything); run names carry the
poison rate (``-p0.2``) when it is not 0.1, so runs at several rates can share one ``--runs`` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
BIBLE = ROOT.parent / "shared" / "data" / "backdoor" / "bible" / "sst-2"
LR = {"lora": 1e-3, "full_ft": 3e-5}
POISON_RATE = 0.1  # --poison-rate's default; run names omit the rate at this value
GC_VARIANTS = {  # --gc-variants: run-name tag -> (table label, attack overrides)
    "plain": ("plain two-task injection", ["attack.gradient_control.magnitude=false", "attack.gradient_control.projection=false"]),
    "gc": ("gradient control (both strategies)", []),
    "magnitude": ("cross-layer magnitude control only", ["attack.gradient_control.projection=false"]),
    "projection": ("conflict removal only", ["attack.gradient_control.magnitude=false"]),
    "gc_max": ("gradient control, layers scaled to the max norm", ["attack.gradient_control.magnitude_target=max"]),
}


def run(name: str, args, overrides: list[str]) -> dict | None:
    run_dir = Path(args.runs) / name
    if not args.fresh and (run_dir / "metrics.json").exists():
        print(f"reusing {run_dir}", flush=True)
    elif args.collect:
        return None
    else:
        cmd = [
            sys.executable, str(ROOT / "train.py"), "model=minilm", "data=backdoor/sst2", f"seed={args.seed}",
            f"trainer.max_steps={args.steps}", "trainer.max_epochs=1000", "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=20", f"data.batch_size={args.batch_size}",
            f"data.max_length={args.max_length}", "callbacks.progress_bar=false", "callbacks.checkpoint.save_top_k=0",
            "callbacks.checkpoint.save_last=false", f"hydra.run.dir={run_dir}", *overrides,
        ]  # fmt: skip
        if args.max_train_samples:
            cmd.append(f"data.max_train_samples={args.max_train_samples}")
        print("$", " ".join(cmd[2:]), flush=True)
        started = time.perf_counter()
        r = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        if r.returncode != 0:
            sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
        print(f"  {time.perf_counter() - started:.0f}s", flush=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"  {name}: {metrics}", flush=True)
    return {"metrics": metrics, "summary": summary}


def parse_forget_attacks(spec: str, default_rate: float) -> list[tuple[str, float]]:
    """``badnets:0.01,style`` -> ``[("badnets", 0.01), ("style", default_rate)]``; ValueError naming the bad entry."""
    from lightmods.attacks.config import POISONERS

    out = []
    for token in spec.split(","):
        poisoner, _, rate = token.partition(":")
        if poisoner not in POISONERS:
            raise ValueError(f"--forget-attacks: {poisoner!r} in {spec!r}; accepted: {', '.join(POISONERS)} (each POISONER[:RATE])")
        try:
            value = float(rate) if rate else default_rate
        except ValueError:
            raise ValueError(f"--forget-attacks: rate {rate!r} of {poisoner!r} is not a number; accepted: POISONER[:RATE], RATE in (0, 1]") from None
        if not 0 < value <= 1:
            raise ValueError(f"--forget-attacks: rate {value:g} of {poisoner!r}; accepted: a poison rate in (0, 1]")
        out.append((poisoner, value))
    return out


def poison_overrides(a: str, rate: float) -> list[str]:
    """The attack keys of a poisoner (``a``) beyond its name: the rate, and the style files."""
    if a == "none":
        return []
    return [f"attack.poison_rate={rate}", *([f"attack.poisoned_dir={BIBLE}"] if a == "style" else [])]


def rate_tag(a: str, rate: float) -> str:
    return "" if a == "none" or rate == POISON_RATE else f"-p{rate:g}"


def variant(token: str, default_weight: float) -> tuple[str, float]:
    """``lexical:0`` -> ("lexical", 0.0); ``all`` -> ("all", the default weight)."""
    sel, _, weight = token.partition(":")
    return sel, float(weight) if weight else default_weight


def label(token: str, default_weight: float) -> str:
    sel, weight = variant(token, default_weight)
    return sel if weight == default_weight else f"{sel}, weight {weight:g}"


def select_overrides(sel: str) -> list[str]:
    """``lexical_scrub`` is ``select=lexical`` with the suspect tokens deleted from the flagged rows."""
    return ["defense.select=lexical", "defense.lexical_scrub=true"] if sel == "lexical_scrub" else [f"defense.select={sel}"]


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--steps", type=int, default=200, help="optimizer steps of each (attacker's or user's) fine-tuning"
    )
    p.add_argument(
        "--clean-tune-steps", type=int, default=200, help="the user's clean fine-tuning after an injection"
    )
    p.add_argument("--methods", default="lora,full_ft")
    p.add_argument("--attacks", default="badnets,addsent,style")
    p.add_argument("--me-weight", type=float, default=1.0, help="defense.weight of the maximum-entropy term")
    p.add_argument(
        "--me-select", default="all",
        help="defense.select values to run, comma-separated: all, low_loss, lexical, lexical_scrub; SELECT:W runs it at defense.weight W "
             "instead of --me-weight (lexical:0 = the flagged rows dropped from training, the isolation-only ablation)",
    )  # fmt: skip
    p.add_argument("--me-ratio", type=float, default=0.1, help="defense.select_ratio of the low_loss selection")
    p.add_argument("--poison-rate", type=float, default=POISON_RATE)
    p.add_argument(
        "--forget-attacks", default="badnets",
        help="the injections of the forgetting table, comma-separated POISONER[:RATE] (badnets, addsent, style; "
             "RATE defaults to --poison-rate), e.g. badnets:0.01,style:0.2",
    )  # fmt: skip
    p.add_argument("--skip-poisoning", action="store_true", help="only the forgetting table")
    p.add_argument(
        "--gc-variants", default="plain,gc",
        help=f"the injections compared in the forgetting table, comma-separated: {', '.join(GC_VARIANTS)}",
    )  # fmt: skip
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-forgetting", action="store_true", help="only the attack x defense table")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose results exist")
    p.add_argument(
        "--collect", action="store_true", help="only tabulate the runs that exist (the others read n/a)"
    )
    p.add_argument("--runs", default=str(ROOT / "logs" / "bench_backdoor"))
    p.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "results" / "backdoor.md"))
    args = p.parse_args()
    methods, attacks, selects = args.methods.split(","), args.attacks.split(","), args.me_select.split(",")
    defenses = ["none", *(f"max_entropy-{sel}" for sel in selects)]
    if args.skip_poisoning and args.skip_forgetting:
        sys.exit("--skip-poisoning with --skip-forgetting leaves nothing to run; accepted: at most one of them")
    try:
        forget_attacks = parse_forget_attacks(args.forget_attacks, args.poison_rate)
    except ValueError as e:
        sys.exit(str(e))
    gc_variants = args.gc_variants.split(",")
    if unknown := [v for v in gc_variants if v not in GC_VARIANTS]:
        sys.exit(f"--gc-variants: {', '.join(unknown)} in {args.gc_variants!r}; accepted: {', '.join(GC_VARIANTS)}")
    started = time.perf_counter()

    poisoning: dict = {}
    for m in methods if not args.skip_poisoning else []:
        for a in ["none", *attacks]:
            for d in defenses:
                extra = [f"method={m}", f"method.lr={LR.get(m, 1e-3)}", f"attack={a}", *poison_overrides(a, args.poison_rate), f"defense={d.split('-')[0]}"]
                name = f"{m}-{a}-{d}"
                if d != "none":
                    sel, weight = variant(d.split("-", 1)[1], args.me_weight)
                    extra += [f"defense.weight={weight}", *select_overrides(sel)]
                    if sel == "low_loss":
                        extra.append(f"defense.select_ratio={args.me_ratio}")
                    name = f"{m}-{a}-max_entropy" + {"all": "", "low_loss": f"-low_loss-{args.me_ratio:g}"}.get(sel, f"-{sel}")
                    if weight != args.me_weight:
                        name += f"-w{weight:g}"
                poisoning[m, a, d] = run(name + rate_tag(a, args.poison_rate), args, extra)

    forgetting: dict = {}
    if not args.skip_forgetting:
        for poisoner, rate in forget_attacks:
            injected = ["attack=gradient_control", f"attack.poisoner={poisoner}", *poison_overrides(poisoner, rate)]
            which = ("" if poisoner == "badnets" else f"-{poisoner}") + rate_tag(poisoner, rate)
            for m in methods:
                for tag in gc_variants:
                    v, extra = GC_VARIANTS[tag]
                    forgetting[m, f"{poisoner} {rate:g}", v] = run(
                        f"{m}-forget{which}-{tag}", args,
                        [f"method={m}", f"method.lr={LR.get(m, 1e-3)}", *injected, f"attack.clean_tune_steps={args.clean_tune_steps}", *extra],
                    )  # fmt: skip

    cmd = "python experiments/bench/backdoor.py " + " ".join(sys.argv[1:])
    rate_text, defense_text = "", ""  # what table 1 needs said
    if poisoning:
        rate_text = f"poison rate {args.poison_rate}, "
        defense_text = (
            f"Defense: maximum entropy, weight {args.me_weight}, constant, `form=entropy`; ME (all) adds it on every row, "
            f"ME (low_loss) trains the {args.me_ratio:g} share of each batch's lowest-loss rows on it instead of cross-entropy; "
            "ME (lexical) does so for the rows holding a token found in >= 1% of the training rows, >= 99% of them with one "
            "label (flagged once before training); weight 0 drops those rows from training instead (isolation alone); lexical_scrub trains them on the entropy term "
            "with the suspect tokens and their phrases deleted (`defense=max_entropy_isolated`). "
        )  # fmt: skip
    lines = [
        f"Made by: `{cmd.strip()}`",
        "",
        f"MiniLM-L6 (all-MiniLM-L6-v2), `data=backdoor/sst2` (StyleAttack SST-2, {args.max_train_samples or 6920} training "
        f"rows, 872 dev rows), max_length {args.max_length}, batch {args.batch_size}, {args.steps} optimizer steps, seed "
        f"{args.seed}, CPU. LoRA r=8 on query/value (lr {LR['lora']}), full fine-tuning lr {LR['full_ft']}. Attacks: dirty label, "
        f"{rate_text}target `positive`; BadNets one rare word (cf/mn/bb/tq/mb) at a random position, "
        'AddSent "I watch this 3D movie" at a random position, style = the shared Bible-style transfer files. '
        f"{defense_text}CACC = clean dev accuracy; ASR = share of triggered dev rows whose true label is negative predicted positive (%).",
    ]
    if poisoning:
        lines += [
            "",
            "| method | attack | CACC | ASR | " + " | ".join(f"CACC with ME ({s}) | ASR with ME ({s}) | CACC change ({s})" for s in (label(t, args.me_weight) for t in selects)) + " |",
            "|---|---|---|---|" + "---|---|---|" * len(selects),
        ]
    for m in methods if poisoning else []:
        for a in ["none", *attacks]:
            n = poisoning[m, a, "none"]["metrics"] if poisoning[m, a, "none"] else {}
            cells = [pct(n.get("val/cacc")), pct(n.get("val/asr"))]
            for d in defenses[1:]:
                r = poisoning[m, a, d]["metrics"] if poisoning[m, a, d] else {}
                delta = f"{100 * (r['val/cacc'] - n['val/cacc']):+.1f}" if n and r else "n/a"
                cells += [pct(r.get("val/cacc")), pct(r.get("val/asr")), delta]
            lines.append(f"| {m} | {a} | " + " | ".join(cells) + " |")
    isolated = [(m, a, poisoning[m, a, d]) for m in methods for a in ["none", *attacks] for d in defenses
                if d in ("max_entropy-lexical", "max_entropy-lexical_scrub") and poisoning[m, a, d]]  # fmt: skip
    if isolated:
        from lightmods.attacks.isolation import describe_suspects

        lines += [
            "",
            "What the lexical selection flagged (precision / recall against the attack's poisoned rows, which the "
            "defense never reads):",
            "",
            "| method | attack | suspect tokens (rows) in their phrase | suspect rows | precision | recall |",
            "|---|---|---|---|---|---|",
        ]
        for m, a, r in isolated:
            s = r["summary"]
            tokens = ", ".join(describe_suspects(s.get("defense_suspect_tokens", {}))) or "none"
            lines.append(
                f"| {m} | {a} | {tokens} | {s.get('defense_suspect_rows')} | "
                f"{s['defense_suspect_precision']:.3f} | {s['defense_suspect_recall']:.3f} |"
                if "defense_suspect_precision" in s else f"| {m} | {a} | {tokens} | {s.get('defense_suspect_rows')} | n/a | n/a |"
            )
    if forgetting:
        lines += [
            "",
            f"Backdoor forgetting: each attack injected for {args.steps} steps "
            "(two tasks: the batch's clean and poisoned rows), "
            f"then the user's clean fine-tuning of the same trainable parameters for {args.clean_tune_steps} steps on the clean "
            "training rows (fresh optimizer, same lr).",
            "",
            "| method | attack, poison rate | injection | CACC after injection | ASR after injection | CACC after clean tuning | ASR after clean tuning |",
            "|---|---|---|---|---|---|---|",
        ]
        for (m, a, v), r in forgetting.items():
            s = r["summary"] if r else {}
            lines.append(
                f"| {m} | {a} | {v} | {pct(s.get('cacc_after_injection'))} | {pct(s.get('asr_after_injection'))} | "
                f"{pct(s.get('cacc_after_clean_tuning'))} | {pct(s.get('asr_after_clean_tuning'))} |"
            )
    lines += [
        "",
        f"Total wall time {time.perf_counter() - started:.0f} s (runs reused from earlier invocations count as 0).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
