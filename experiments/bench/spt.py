"""SPT against LoRA on MiniLM (real weights): step time and memory at SST-2's length and at a long length,
plus a short-training accuracy comparison on SST-2, side by side in one run.

    nice -n 10 python experiments/bench/spt.py [--lengths 64,512] [--batch 8] [--steps 4] [--train-steps 150]
        [--train-samples 2400] [--threads 1] [--reuse] [--out experiments/bench/results/spt.md]

Efficiency: every (method, length) runs in its own process (``--child``) so that the peak resident memory
(``ru_maxrss``) belongs to that configuration alone. A batch is made of real SST-2 training sentences; at
the long length several sentences are concatenated per row until it is full. Each process reports the
median step time (forward, backward, AdamW step) after one warm-up step, the bytes autograd saved for
backward (activation memory; ``lightmods.spt.measure.saved_activation_bytes``), and the peak RSS above the
RSS after the model was built. LoRA = ``method=lora`` defaults (r=8 on query/value, SDPA attention);
SPT = ``method=spt`` defaults (the same LoRA, key_fraction=1/8, 2 of 4 FFN blocks per token).

Accuracy: ``python train.py method=<lora|spt> model=minilm data=glue/sst2 data.data_dir=../shared/data/glue/SST-2``
with ``data.max_train_samples`` and ``trainer.max_steps`` cut for a CPU budget, dev accuracy on all 872 rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sst2_batch(tokenizer, batch: int, length: int) -> dict:
    """``batch`` rows of real SST-2 training text; at long lengths, sentences concatenated until full."""
    import torch

    with open(SST2 / "train.tsv", newline="") as f:
        rows = [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    texts, i = [], 0
    for _ in range(batch):
        parts, n = [], 0
        while True:
            parts.append(rows[i % len(rows)])
            i += 1
            n += len(tokenizer.tokenize(parts[-1]))
            if n >= length - 2 or length <= 128:
                break
        texts.append(" ".join(parts))
    enc = tokenizer(texts, padding="max_length" if length > 128 else True, truncation=True, max_length=length, return_tensors="pt")
    labels = torch.tensor([i % 2 for i in range(batch)])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def child(method: str, length: int, batch: int, steps: int, threads: int) -> dict:
    """One configuration in this process: build MiniLM + method, time ``steps`` training steps."""
    import torch

    torch.set_num_threads(threads)
    from lightmods.config import register_schemas, validate
    from lightmods.data.tasks import get_task
    from lightmods.methods import build_method
    from lightmods.models import build_backbone, build_tokenizer, family_of
    from lightmods.spt.measure import saved_activation_bytes
    from tests.conftest import compose_run

    register_schemas()
    overrides = ["model=minilm", "data=glue/sst2", f"data.data_dir={SST2}", f"method={method}"]
    if method == "spt":
        overrides.append("method.compare_steps=0")
    rc = validate(compose_run(overrides, Path("/tmp/spt_bench_cfg")))
    torch.manual_seed(0)
    task = get_task(rc.data.task)
    tok = build_tokenizer(rc.model)
    model = build_backbone(rc.model, task, tok)
    model = build_method(rc.method).prepare(model, family_of(model))
    data = sst2_batch(tok, batch, length)
    labels = data.pop("labels")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rc.method.lr)
    model.train()
    rss0 = _rss_mb()
    times, act = [], 0
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits, act = saved_activation_bytes(model, lambda: model(**data).logits)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        del logits
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method, "length": int(data["input_ids"].shape[1]), "batch": batch,
        "real_tokens": int(data["attention_mask"].sum()), "step_s": statistics.median(times[1:]),
        "activation_mb": act / 2**20, "peak_rss_mb": peak, "peak_rss_above_model_mb": peak - rss0,
    }  # fmt: skip


def efficiency(args) -> list[dict]:
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for method in ("lora", "spt"):
            cmd = [sys.executable, __file__, "--child", method, "--length", str(length), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
            print("$", " ".join(cmd[1:]), flush=True)
            cache = ROOT / "experiments" / "bench" / "_runs" / f"spt-eff-{method}-{length}-b{args.batch}-s{args.steps}.json"
            if args.reuse and cache.exists():
                rows.append(json.loads(cache.read_text()))
                print("   reusing", cache, flush=True)
                continue
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                sys.exit(f"{method} at length {length} failed:\n{r.stderr[-4000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(rows[-1]) + "\n")
            print("  ", rows[-1], flush=True)
    return rows


def accuracy(args) -> dict:
    out = {}
    for method in ("lora", "spt"):
        run_dir = ROOT / "experiments" / "bench" / "_runs" / f"spt-sst2-{method}"
        cmd = [
            sys.executable, str(ROOT / "train.py"), "model=minilm", "data=glue/sst2", f"data.data_dir={SST2}", f"method={method}",
            f"data.max_train_samples={args.train_samples}", f"trainer.max_steps={args.train_steps}", "trainer.max_epochs=100",
            "trainer.num_sanity_val_steps=0", "trainer.check_val_every_n_epoch=100", "callbacks.progress_bar=false",
            "callbacks.checkpoint.save_top_k=0", "seed=42", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        started = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if r.returncode != 0:
            sys.exit(f"training {method} failed:\n{r.stderr[-4000:]}")
        out[method] = {
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "wall_s": time.perf_counter() - started,
        }
        print(f"   {method}: {out[method]['metrics']} in {out[method]['wall_s']:.0f}s", flush=True)
    return out


def write(args, rows: list[dict], acc: dict, wall: float) -> None:
    cmd = "nice -n 10 python experiments/bench/spt.py " + " ".join(a for a in sys.argv[1:])
    lines = [
        "# SPT vs LoRA on MiniLM (CPU)", "",
        f"Command: `{cmd.strip()}` (total {wall / 60:.1f} min).", "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch {__import__('torch').__version__}, "
        f"{args.threads} thread(s) per process; no GPU.", "",
        "## Training step time and memory (batch of real SST-2 text, one process per row)", "",
        f"Batch {args.batch}; median of {args.steps} steps (forward + backward + AdamW) after a warm-up step. "
        "Activation memory = bytes autograd keeps for backward (parameters excluded); peak RSS = `ru_maxrss` "
        "of the process, and its rise above the RSS once the model was built."
        + (" Rows were reused from an earlier invocation with the same settings (`--reuse`)." if args.reuse else ""), "",
        "| length | method | step time (s) | activation memory (MB) | peak RSS (MB) | peak RSS above model (MB) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    by = {(r["length"], r["method"]): r for r in rows}
    for r in rows:
        lines.append(f"| {r['length']} | {r['method']} | {r['step_s']:.3f} | {r['activation_mb']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_above_model_mb']:.0f} |")
    lines += ["", "| length | LoRA / SPT step time (speed-up) | SPT / LoRA activation memory | SPT / LoRA peak RSS above model |", "|---|---|---|---|"]
    for length in sorted({r["length"] for r in rows}):
        lo, sp = by[(length, "lora")], by[(length, "spt")]
        lines.append(
            f"| {length} | {lo['step_s'] / sp['step_s']:.2f}x | {sp['activation_mb'] / lo['activation_mb']:.2f} | "
            f"{sp['peak_rss_above_model_mb'] / max(lo['peak_rss_above_model_mb'], 1e-9):.2f} |"
        )
    lines += [
        "", "## Short training on SST-2", "",
        f"`data.max_train_samples={args.train_samples}`, `trainer.max_steps={args.train_steps}` (batch 32, seed 42), "
        "dev accuracy on the 872 dev sentences; throughput and peak memory are the runs' own `summary.json` figures.", "",
        "| method | dev accuracy | train samples/s | peak RSS (MB) | trainable params | wall (s) |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for m, r in acc.items():
        s = r["summary"]
        lines.append(
            f"| {m} | {r['metrics']['val/accuracy']:.4f} | {s['train_samples_per_s']} | {s['peak_memory_mb']} | "
            f"{s['params_trainable']:,} | {r['wall_s']:.0f} |"
        )
    if "spt" in acc and "vs_lora" in acc["spt"]["summary"].get("spt", {}):
        v = acc["spt"]["summary"]["spt"]["vs_lora"]
        lines += ["", f"SPT's own `summary.json` comparison (random batch {v['batch_size']} x {v['length']}, before training): "
                  f"step time LoRA/SPT {v['step_time_ratio_lora_over_spt']}, activation memory SPT/LoRA "
                  f"{v['activation_memory_ratio_spt_over_lora']}."]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("wrote", args.out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--lengths", default="64,512")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--train-samples", type=int, default=2400)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse finished efficiency rows from experiments/bench/_runs")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench" / "results" / "spt.md")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.length, args.batch, args.steps, args.threads)))
        return
    started = time.perf_counter()
    rows = efficiency(args)
    acc = {} if args.skip_accuracy else accuracy(args)
    write(args, rows, acc, time.perf_counter() - started)


if __name__ == "__main__":
    main()
