"""Light-PEFT against its LoRA baseline: same backbone, data, steps, batch size and seed, in one run.

    python experiments/bench/light_peft.py [--tasks glue/sst2,glue/rte] [--steps 600] [--estimate-steps 100]
        [--model minilm] [--device cpu|gpu] [--precision 32-true|bf16-mixed] [--prune-ratios 0.333:0.333,0.5:0.5,0.5:0.5:foundation]
        [--jobs 2 --threads 1] [--out experiments/bench/results/light_peft.md]

Each training runs as its own ``python train.py`` process (so peak memory is per run); ``--prune-ratios`` adds one
Light-PEFT run per ``head:neuron`` pair (the foundation-pruning ablation axis; ``head:neuron:foundation`` the same
without PEFT pruning, every module at full rank), all against the same LoRA run. Training throughput
is the run's own meter: the whole run for LoRA, the phase after pruning for Light-PEFT (its estimation phase
is reported too). Inference throughput is measured afterwards in this process on both exported models,
adapters merged, alternating rounds over the same dev batches. The ideal speed-up is the ratio of the
block FLOPs per token (linear layers + attention scores) before and after pruning.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightmods.export import load_checkpoint_model, load_export  # noqa: E402
from lightmods.peft import merge_adapters  # noqa: E402
from lightmods.structure import blocks  # noqa: E402

GLUE_DIRS = {"glue/sst2": "SST-2", "glue/rte": "RTE", "glue/mrpc": "MRPC", "glue/qnli": "QNLI", "glue/cola": "CoLA", "glue/stsb": "STS-B"}


def run(name: str, task: str, args, extra: list[str], out: Path) -> dict:
    run_dir = out / f"{task.replace('/', '_')}-{name}"
    cmd = [
        sys.executable, str(ROOT / "train.py"), f"model={args.model}", f"data={task}", f"seed={args.seed}",
        f"trainer={args.device}", f"trainer.precision={args.precision}", f"trainer.max_steps={args.steps}", "trainer.max_epochs=1000",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
        f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}", "callbacks.progress_bar=false",
        "callbacks.checkpoint.save_top_k=0", f"hydra.run.dir={run_dir}", *args.extra.split(), *extra,
    ]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    done = run_dir / "summary.json"
    if args.reuse and done.exists() and json.loads(done.read_text()).get("status") == "completed":
        print("  reusing the finished run in", run_dir, flush=True)
        return {"dir": run_dir, "summary": json.loads(done.read_text()), "metrics": json.loads((run_dir / "metrics.json").read_text())}
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{name} on {task} failed:\n{r.stderr[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"  done in {time.perf_counter() - started:.0f}s: {metrics}", flush=True)
    return {"dir": run_dir, "summary": summary, "metrics": metrics}


def block_flops_per_token(model, seq_len: int) -> float:
    """Multiply-adds x 2 per token in the transformer blocks: every linear layer plus QK^T and AV. LoRA factors
    (``lora_A`` / ``lora_B``) are left out: the models timed here have them merged into the base weights."""
    total = 0.0
    for b in blocks(model):
        for name, m in b.module.named_modules():
            lora_factor = any(part.startswith("lora_") for part in name.split("."))
            if isinstance(m, torch.nn.Linear) and "Lora" not in type(m).__name__ and not lora_factor:
                total += 2 * m.in_features * m.out_features
        total += 2 * 2 * seq_len * b.num_heads * b.head_dim
    return total


@torch.no_grad()
def time_inference(models: dict, batches: list[dict], rounds: int, device) -> dict:
    out = {k: [] for k in models}
    for _ in range(rounds):
        for name, model in models.items():
            model(**batches[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in batches:
                model(**b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[name].append(sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in out.items()}


def time_training(models: dict, batches: list[dict], rounds: int, device) -> dict:
    """Training samples/s of each model (forward, backward, AdamW step on its trainable parameters),
    alternating models each round over the same batches."""
    out = {k: [] for k in models}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()}
    for _ in range(rounds):
        for name, model in models.items():
            model.train()
            for i, b in enumerate(batches):
                if i == 1:  # the first batch warms up
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(**b["inputs"]).logits.float(), b["labels"])
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[name].append(sum(len(b["labels"]) for b in batches[1:]) / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in out.items()}


def dev_batches(run_dir: Path, n: int, device, split: str = "validate") -> list[dict]:
    from omegaconf import OmegaConf

    from lightmods.config import validate
    from lightmods.data import TextClassificationDataModule, get_task
    from lightmods.models import build_tokenizer

    rc = validate(OmegaConf.create(json.loads((run_dir / "export" / "lightmods.json").read_text())["config"]))
    task = get_task(rc.data.task)
    dm = TextClassificationDataModule(task, rc.data, build_tokenizer(rc.model), seed=0)
    dm.setup("fit" if split == "fit" else "validate")
    loader = dm.train_dataloader() if split == "fit" else dm.val_dataloader()
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    batches = []
    for b in itertools.islice(itertools.cycle(loader) if split == "fit" else loader, n):  # few-shot train sets: cycle
        inputs = {k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batches.append(inputs if split != "fit" else {"inputs": inputs, "labels": b["labels"].to(device)})
    return batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="glue/sst2,glue/rte")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "glue"), help="GLUE tsv folders ('' = hub)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--estimate-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--precision", default="32-true")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--infer-batches", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--prune-ratios", default=f"{PAPER_RATIO}:{PAPER_RATIO}",
        help="comma-separated head:neuron prune ratios, one Light-PEFT run each (default: the paper's 1/3:1/3); "
        "head:neuron:foundation prunes the foundation model only (method.prune_peft=false, every PEFT module kept)",
    )
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (use with --threads)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per training run (0 = torch's default)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs of the same work dir (re-measure only)")
    p.add_argument("--extra", default="", help="more overrides for both runs, e.g. 'model.init=random'")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/light_peft.md"))
    p.add_argument("--work", default="/tmp/lightmods-bench-light-peft")
    args = p.parse_args()
    args.variants = [parse_ratio(r) for r in args.prune_ratios.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    rows = []
    for task in args.tasks.split(","):
        data = [f"data.data_dir={args.data_root}/{GLUE_DIRS[task]}"] if task in GLUE_DIRS and args.data_root else []
        jobs = [("lora", ["method=lora", f"method.lr={args.lr}", *data])]
        for heads, neurons, foundation_only in args.variants:
            jobs.append((
                variant_name(heads, neurons, foundation_only),
                ["method=light_peft", f"method.lr={args.lr}", f"method.estimate_steps={args.estimate_steps}",
                 f"method.head_prune_ratio={heads}", f"method.neuron_prune_ratio={neurons}",
                 *(["method.prune_peft=false"] if foundation_only else []), *data],
            ))  # fmt: skip
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            done = dict(zip([n for n, _ in jobs], pool.map(lambda job, task=task: run(job[0], task, args, job[1], work), jobs)))
        models, trainable = {}, {}
        for name, r in done.items():
            m = load_export(r["dir"] / "export").to(device).eval()
            merge_adapters(m)
            models[name] = m.to(torch.bfloat16) if "bf16" in args.precision else m
            trainable[name] = load_checkpoint_model(r["dir"] / "checkpoints" / "last.ckpt").to(device)
        first = done[jobs[1][0]]["dir"]
        batches = dev_batches(first, args.infer_batches, device)
        seq = statistics.mean(int(b["attention_mask"].shape[1]) for b in batches)
        infer = time_inference(models, batches, args.rounds, device)
        flops = {k: block_flops_per_token(m, int(seq)) for k, m in models.items()}
        train_rate = time_training(trainable, dev_batches(first, args.infer_batches + 1, device, split="fit"), args.rounds, device)
        rows.append((task, done, infer, flops, train_rate))
    write_table(args, rows)


PAPER_RATIO = 0.3333333333


FOUNDATION_ONLY = "foundation"  # the third field of a --prune-ratios entry: no PEFT pruning


def parse_ratio(text: str) -> tuple[float, float, bool]:
    """``head:neuron`` prune ratios, each in [0, 1), optionally ``:foundation`` (foundation pruning only)."""
    fields = text.split(":")
    foundation_only = len(fields) == 3 and fields[2] == FOUNDATION_ONLY
    try:
        if len(fields) != 2 + foundation_only:
            raise ValueError
        heads, neurons = float(fields[0]), float(fields[1])
    except ValueError:
        sys.exit(f"--prune-ratios: {text!r} is not head:neuron[:{FOUNDATION_ONLY}] (two numbers in [0, 1), e.g. 0.5:0.5)")
    if not (0 <= heads < 1 and 0 <= neurons < 1):
        sys.exit(f"--prune-ratios: {text!r} out of range; each ratio must be in [0, 1)")
    return heads, neurons, foundation_only


def variant_name(heads: float, neurons: float, foundation_only: bool = False) -> str:
    name = "light_peft" if (heads, neurons) == (PAPER_RATIO, PAPER_RATIO) else f"light_peft-h{heads:g}-n{neurons:g}"
    return name + ("-fonly" if foundation_only else "")


def ratio_label(name: str) -> str:
    parts = name.split("-")
    suffix = ", foundation only" if parts[-1] == "fonly" else ""
    parts = parts[:-1] if suffix else parts
    if len(parts) == 1:
        return f"Light-PEFT (1/3, 1/3{suffix})"
    _, h, n = parts
    return f"Light-PEFT ({h[1:]}, {n[1:]}{suffix})"


def write_table(args, rows) -> None:
    argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--out") and sys.argv[i] != "--out"]
    cmd = "python experiments/bench/light_peft.py " + shlex.join(argv)
    threads = f", {args.jobs} training run(s) at once with {args.threads or 'default'} thread(s) each" if args.jobs > 1 else ""
    lines = [
        "# Light-PEFT vs LoRA",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Backbone `{args.model}`, {args.steps} steps of batch {args.batch_size} (max length {args.max_length}), seed {args.seed}, "
        f"{args.device} {args.precision}{threads}; Light-PEFT estimates for {args.estimate_steps} steps, then prunes the "
        "(head, FFN neuron) fractions in brackets (heads per layer, neurons globally; 1/3 each is the paper's default), keeps "
        "25% of PEFT modules and half of their ranks (\"foundation only\": keeps every PEFT module at full rank). "
        "LoRA baseline: rank 8 on query/value (the official vanilla baseline). Training samples/s in the table: each run's "
        "own meter, LoRA over its whole run, Light-PEFT after pruning (before pruning in brackets); with several runs at "
        "once these meters share the CPU, so the speed-ups below are measured side by side instead: the final models "
        "(from last.ckpt) train on the same batches in alternating rounds. Inference: exported models, adapters merged, "
        f"median of {args.rounds} alternating rounds over the same dev batches. Ideal = block FLOPs per token before / after.",
        "",
        "| task | method | dev acc | foundation params | trainable params | train samples/s | inference samples/s | peak mem (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    acc = lambda r: r["metrics"].get("val/accuracy", r["metrics"].get("val/score"))  # noqa: E731
    for task, done, infer, flops, train_rate in rows:
        base = done["lora"]
        bs = base["summary"]
        lines.append(
            f"| {task} | LoRA | {acc(base):.4f} | {bs['params_by_role']['backbone']['total']:,} | {bs['params_trainable']:,} | "
            f"{bs['train_samples_per_s']:.1f} | {infer['lora']:.1f} | {bs['peak_memory_mb']:.0f} |"
        )
        for name, light in done.items():
            if name == "lora":
                continue
            ls = light["summary"]
            lines.append(
                f"| {task} | {ratio_label(name)} | {acc(light):.4f} | {ls['params_foundation_after']:,} (from "
                f"{ls['params_foundation_before']:,}) | {ls['params_trainable_after']:,} (from {ls['params_trainable_before']:,}) | "
                f"{ls['train_samples_per_s_after']:.1f} ({ls['train_samples_per_s_before']:.1f}) | {infer[name]:.1f} | "
                f"{ls['peak_memory_mb']:.0f} |"
            )
            train_x = train_rate[name] / train_rate["lora"]
            infer_x = infer[name] / infer["lora"]
            ideal = flops["lora"] / flops[name]
            removed = 1 - ls["params_foundation_after"] / ls["params_foundation_before"]
            notes.append(
                f"- {task}, {ratio_label(name)}: accuracy {100 * (acc(light) - acc(base)):+.2f} points; foundation parameters "
                f"-{100 * removed:.1f}%; trainable {ls['params_trainable_after'] / bs['params_trainable']:.2f}x of LoRA's; "
                f"training speed-up {train_x:.2f}x side by side ({train_rate[name]:.1f} vs {train_rate['lora']:.1f} samples/s), "
                f"inference {infer_x:.2f}x, ideal (FLOPs) {ideal:.2f}x: measured/ideal = {train_x / ideal:.2f} (training), "
                f"{infer_x / ideal:.2f} (inference); heads kept per layer {ls['heads_kept_per_layer']}, neurons "
                f"{ls['neurons_kept_per_layer']}."
            )
    lines += ["", *notes, ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
