"""Structured compression side by side: TransAct, PAT, WID and mask pruning at 25% and 50% compression.

    python experiments/bench/compression.py [--steps 300] [--ratios 0.25,0.5] [--methods transact,pat,wid,mask_prune]
        [--parts encoder,decoder] [--method-steps wid=100] [--decoder-steps 80] [--wid-compactor-lr 1e-5] [--jobs 2] [--threads 1] [--reuse]
        [--out experiments/bench/results/compression.md]

Encoder part: all-MiniLM-L6-v2 (real weights) on the shared SST-2 (6,920 training sentences, dev 872). The
uncompressed references are full fine-tuning and LoRA for the same number of steps; the full fine-tuned model
is the teacher of the methods that distil (mask pruning, WID). Decoder part: a tiny LLaMA-style model trained
from scratch on the shared BoolQ passages (``data=lm/text``), then compressed by each method from that
checkpoint, beside LoRA tuned from it for as many steps (the uncompressed baseline PAT is compared with);
quality is held-out perplexity.

"Compression c" asks each method for its own structural knob at c: TransAct keeps 1-c of the attention units
and FFN neurons, PAT removes c of the hidden channels, WID keeps 1-c of its compacted widths, mask pruning
extracts the model whose kept parameters are 1-c of the prunable ones. The table reports what each really
removed (parameters of the whole model, embeddings included, and analytic FLOPs per sample). Inference speed is
measured afterwards in this process on the exported models (adapters merged), alternating rounds over the same
dev batches, so the ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
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

from experiments.bench.light_peft import dev_batches, time_inference  # noqa: E402
from lightmods.export import load_export  # noqa: E402
from lightmods.peft import merge_adapters  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def method_overrides(method: str, c: float, args, teacher: Path, steps: int | None) -> list[str]:
    """The overrides that ask ``method`` for compression ``c`` in a run of ``steps`` steps."""
    keep = round(1 - c, 4)
    steps = steps or args.steps
    if method == "transact":
        return ["method=transact", f"method.target_attn_ratio={keep}", f"method.target_ffn_ratio={keep}", f"method.shots={args.shots}"]
    if method == "pat":
        return ["method=pat", f"method.prune_ratio={c}", f"method.mask_steps={max(2, int(steps * 0.8))}", "method.lr=5e-4"]
    if method == "mask_prune":
        return ["method=mask_prune", f"method.teacher={teacher}", f"method.extract_sizes=[{keep}]", f"method.finetune_size={keep}",
                f"method.sparse_steps={steps // 2}"]  # fmt: skip
    if method == "wid":
        lr = [f"method.compactor_lr={args.wid_compactor_lr}"] if args.wid_compactor_lr else []
        return ["method=wid", f"method.teacher={teacher}", f"method.target_ratio={keep}", *lr]
    raise SystemExit(f"--methods: {method!r} is not accepted; accepted: transact, pat, wid, mask_prune")


def run(name: str, overrides: list[str], args, work: Path, steps: int | None = None) -> dict:
    steps = steps or args.steps
    run_dir = work / name
    done = run_dir / "summary.json"
    if args.reuse and done.exists() and json.loads(done.read_text()).get("status") == "completed":
        print("  reusing", run_dir, flush=True)
    else:
        cmd = [
            sys.executable, str(ROOT / "train.py"), f"seed={args.seed}", f"trainer.max_steps={steps}", "trainer.max_epochs=1000",
            "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "callbacks.progress_bar=false",
            "callbacks.checkpoint.save_top_k=0", f"hydra.run.dir={run_dir}", *overrides,
        ]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        started = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"  FAILED ({name}):\n{r.stderr[-3000:]}", flush=True)
            return {"name": name, "dir": run_dir, "steps": steps, "failed": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
        print(f"  {name} done in {time.perf_counter() - started:.0f}s", flush=True)
    return {"name": name, "dir": run_dir, "steps": steps, "summary": json.loads(done.read_text()),
            "metrics": json.loads((run_dir / "metrics.json").read_text())}


def load_for_inference(run_dir: Path) -> torch.nn.Module:
    model = load_export(run_dir / "export").eval()
    merge_adapters(model)
    return model


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def part(kind: str, args, work: Path) -> list[dict]:
    """The runs of one part, each with its inference speed measured side by side against the reference."""
    if kind == "encoder":
        data = ["model=minilm", "data=glue/sst2", f"data.data_dir={SHARED / 'glue' / 'SST-2'}", f"data.max_length={args.max_length}",
                f"data.batch_size={args.batch_size}"]  # fmt: skip
        ref = run("encoder-full_ft", [*data, "method=full_ft", "method.lr=5e-5"], args, work)
        refs = [ref, run("encoder-lora", [*data, "method=lora", "method.lr=5e-4"], args, work)]
    else:
        data = ["data=lm/text", f"data.data_dir={SHARED / 'superglue' / 'BoolQ'}", "data.lm.train_file=val.jsonl",
                "data.lm.text_field=passage", f"data.max_length={args.max_length}", f"data.batch_size={args.batch_size}"]  # fmt: skip
        ref = run("decoder-pretrain", ["model=tiny_llama", "model.arch.hidden_size=128", "model.arch.intermediate_size=384",
                                       "model.arch.num_hidden_layers=4", "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2",
                                       *data, "method=full_ft", "method.lr=2e-3"], args, work)  # fmt: skip
        if "failed" in ref:
            return [ref]
        data = ["model=tiny_llama", f"model.name_or_path={ref['dir'] / 'export'}", "model.init=pretrained", *data]
        refs = [ref, run("decoder-lora", [*data, "method=lora", "method.lr=5e-4"], args, work, args.decoder_steps)]  # the uncompressed tuning baseline
    teacher = ref["dir"] / "export"
    steps = lambda method: (args.decoder_steps if kind == "decoder" else None) or args.method_steps.get(method)  # noqa: E731
    jobs = [(f"{kind}-{method}-{int(c * 100)}", [*data, *method_overrides(method, c, args, teacher, steps(method))], steps(method))
            for c in args.ratios for method in args.methods]  # fmt: skip
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own process with --threads threads
        runs = [*refs, *pool.map(lambda job: run(job[0], job[1], args, work, job[2]), jobs)]
    ok = [r for r in runs if "failed" not in r]
    models = {r["name"]: load_for_inference(r["dir"]) for r in ok}
    batches = dev_batches(ref["dir"], args.infer_batches, torch.device("cpu"))
    speed = time_inference(models, batches, args.rounds, torch.device("cpu"))
    for r in ok:
        r["params"] = params(models[r["name"]])
        r["infer"] = speed[r["name"]]
    for r in ok:
        r["params_ratio"] = r["params"] / ref["params"]
        r["speedup"] = r["infer"] / ref["infer"]
    return runs


def quality(r: dict) -> str:
    m = r["metrics"]
    if "val/perplexity" in m:
        return f"ppl {m['val/perplexity']:.2f}"
    return f"acc {m.get('val/accuracy', m.get('val/score')):.4f}"


def write_table(args, parts: dict) -> None:
    cmd = "python experiments/bench/compression.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--out"))
    lines = [
        "# Structured compression: TransAct, PAT, WID, mask pruning",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"References {args.steps} training steps, compression runs as in the steps column (batch {args.batch_size}, max length {args.max_length}), seed {args.seed}, CPU fp32, "
        f"{args.threads} thread(s) per run. Inference: exported models (adapters merged), median of {args.rounds} alternating rounds "
        f"over the same {args.infer_batches} dev batches in one process; speed-up and parameters relative to the first row of each part.",
        "",
    ]
    for kind, runs in parts.items():
        lines += [f"## {kind}", "", "| run | steps | quality | parameters | vs reference | FLOPs/sample before -> after | KV cache B/token before -> after | inference samples/s | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in runs:
            if "failed" in r:
                lines.append(f"| {r['name']} | {r['steps']} | failed: {r['failed'][:160]} | | | | | | |")
                continue
            s = r["summary"]
            flops = (f"{s.get('flops_per_sample_before', 0) / 1e6:.1f}M -> {s.get('flops_per_sample_after', s.get('flops_per_sample', 0)) / 1e6:.1f}M"
                     if s.get("flops_per_sample_before") else f"{(s.get('flops_per_sample') or 0) / 1e6:.1f}M")  # fmt: skip
            kv = (f"{s['kv_cache_bytes_per_token_before']} -> {s['kv_cache_bytes_per_token_after']}"
                  if s.get("kv_cache_bytes_per_token_before") else "")  # fmt: skip
            lines.append(f"| {r['name']} | {r['steps']} | {quality(r)} | {r['params']:,} | {r['params_ratio']:.3f}x | {flops} | {kv} | {r['infer']:.1f} | {r['speedup']:.2f}x |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="encoder,decoder")
    p.add_argument("--methods", default="transact,pat,wid,mask_prune")
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shots", type=int, default=2, help="TransAct prune-then-train shots")
    p.add_argument("--method-steps", default="", help="per-method step counts, e.g. 'wid=100' (WID's square compactors cost ~4x a step)")
    p.add_argument("--wid-compactor-lr", type=float, default=None, help="WID's compactor learning rate (default: method.compactor_lr)")
    p.add_argument("--decoder-steps", type=int, default=None, help="steps of every decoder compression run (default: as the encoder's)")
    p.add_argument("--jobs", type=int, default=1, help="compression runs at once (each with --threads threads)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--infer-batches", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reuse", action="store_true", help="keep finished runs of the same work dir (re-measure only)")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/compression.md"))
    p.add_argument("--work", default="/tmp/lightmods-bench-compression")
    args = p.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    args.ratios = [float(c) for c in args.ratios.split(",") if c]
    args.method_steps = {k: int(v) for k, v in (kv.split("=") for kv in args.method_steps.split(",") if kv)}
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    parts = {kind: part(kind, args, work) for kind in args.parts.split(",") if kind}
    write_table(args, parts)


if __name__ == "__main__":
    main()
