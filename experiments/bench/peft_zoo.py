"""PEFT zoo on MiniLM + SST-2: every method with the same steps, seed and batch, plus a focused measurement of
S2FT's training memory and step time against full fine-tuning and LoRA.

    python experiments/bench/peft_zoo.py [--steps 120] [--train-samples 4000] [--methods full_ft,lora,...]
        [--device cpu|cuda] [--bf16] [--threads N] [--skip-zoo] [--skip-focus] [--out experiments/bench/results/peft_zoo.md]

Part 1 (zoo): each method runs ``python train.py model=minilm data=glue/sst2`` in its own process (so the
peak-memory figure is per method) on the first ``--train-samples`` sentences of the SST-2 training split,
``--steps`` optimizer steps at batch ``--batch-size``, seed ``--seed``, each method's own default learning
rate, no validation during training; dev accuracy is the final evaluation on all 872 dev sentences. The
figures come from the run's ``summary.json``: trainable parameters (task head included), training
samples/s (wall-clock between consecutive batches after 3 warm-up batches), and peak memory (CPU: peak
resident memory of the process, weights, data and Python included; CUDA: ``torch.cuda.max_memory_allocated``).
Methods that are not registered are skipped with a message.

Part 2 (focus): in one process, MiniLM with full fine-tuning, LoRA (r=8, query/value), S2FT and S2FT without
its partial back-propagation, on one fixed batch (``--focus-batch`` x ``--focus-seq`` random tokens, AdamW):

- step time: median over ``--focus-rounds`` rounds of ``--focus-steps`` steps (forward, backward, optimizer
  step) after 3 warm-up steps; the rounds alternate the methods so that machine noise hits all of them;
- saved activations: bytes of the distinct storages autograd keeps for backward during one forward, caught
  with ``torch.autograd.graph.saved_tensors_hooks`` (parameter storages excluded; a saved view counts its
  whole storage, since that is what it keeps alive) -- the activation memory of training, on any device;
- gradients and AdamW state: bytes of the ``.grad`` tensors and of the optimizer state after a step;
- training state = weights + gradients + optimizer state + saved activations (all measured tensors);
- on CUDA also the peak allocated memory of one step (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.autograd.graph import saved_tensors_hooks  # noqa: E402

DEFAULT_METHODS = "full_ft,lora,moslora,adapter,loretta_rep,loretta_adp,s2ft"
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
WARMUP = 3
MB = 2**20


def registered_methods() -> set[str]:
    from lightmods.methods import METHODS

    return set(METHODS)


def device_overrides(args) -> list[str]:
    if args.device == "cuda":
        return ["trainer=gpu", f"trainer.precision={'bf16-mixed' if args.bf16 else '32-true'}"]
    return ["trainer=cpu", f"trainer.precision={'bf16-mixed' if args.bf16 else '32-true'}"]


# ---------------------------------------------------------------- part 1: the zoo


def run_method(method: str, args, work: Path) -> dict:
    out = work / method
    overrides = [
        "model=minilm", "data=glue/sst2", f"data.data_dir={SST2}", f"method={method}",
        f"data.max_train_samples={args.train_samples}", f"data.batch_size={args.batch_size}", f"seed={args.seed}",
        f"trainer.max_steps={args.steps}", "trainer.max_epochs=1000", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "callbacks=none", "callbacks.progress_bar=false", "logger=none",
        *device_overrides(args), f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        raise RuntimeError(f"method={method} failed (exit {proc.returncode})")
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "method": method,
        "trainable": summary["params_trainable"],
        "trainable_pct": summary["params_trainable_pct"],
        "adapter": summary["params_by_role"]["adapter"]["trainable"],
        "samples_per_s": summary["train_samples_per_s"],
        "peak_mb": summary["peak_memory_mb"],
        "accuracy": metrics["val/accuracy"],
        "wall_s": time.perf_counter() - started,
        "lr": _method_lr(out),
    }


def _method_lr(out: Path) -> float | None:
    import yaml

    cfg = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    return cfg.get("method", {}).get("lr")


def zoo(args, methods: list[str]) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            r = run_method(method, args, Path(tmp))
            rows.append(r)
            print(
                f"{method}: acc {r['accuracy']:.4f}, {r['trainable']:,} trainable, {r['samples_per_s']} samples/s, "
                f"peak {r['peak_mb']} MB, {r['wall_s']:.0f} s",
                flush=True,
            )
    mem = "peak allocated MB (CUDA)" if args.device == "cuda" else "peak RSS MB"
    lines = [
        f"MiniLM-L6, SST-2 (first {args.train_samples} training sentences, dev 872), {args.steps} steps, batch "
        f"{args.batch_size}, seed {args.seed}, {args.device}{' bf16' if args.bf16 else ''}"
        + (f", {args.threads} threads" if args.threads and args.device == "cpu" else "")
        + f", torch {torch.__version__}. Trainable parameters include the task head (pooler + classifier: 148,610).",
        "",
        f"| method | lr | trainable params | of which adapter / S2 delta | trainable % | train samples/s | {mem} | dev accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['adapter']:,} | {r['trainable_pct']:.2f} | "
            f"{r['samples_per_s']:.1f} | {r['peak_mb']:.0f} | {r['accuracy']:.4f} |"
        )
    return lines


# ---------------------------------------------------------------- part 2: S2FT memory and step time


FOCUS = [
    ("full_ft", "full_ft", []),
    ("lora", "lora", []),
    ("s2ft", "s2ft", []),
    ("s2ft, plain autograd", "s2ft", ["method.partial_backprop=false"]),
]


def build(method: str, overrides: list[str], work: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lightmods.config import register_schemas, validate
    from lightmods.data.tasks import get_task
    from lightmods.methods import build_method
    from lightmods.models import build_backbone, build_tokenizer, family_of

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["model=minilm", "data=glue/sst2", f"method={method}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(work)
    rc = validate(cfg)
    torch.manual_seed(0)
    task = get_task(rc.data.task)
    net = build_backbone(rc.model, task, build_tokenizer(rc.model))
    m = build_method(rc.method)
    net = m.prepare(net, family_of(net))
    return net, m, rc.method.lr


def saved_activation_bytes(fn, exclude: set[int]) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude and s.nbytes() > 0:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


class Trial:
    """One method's model, optimizer and fixed batch: timed steps and one memory measurement."""

    def __init__(self, net, lr: float, batch, args, device: torch.device):
        self.net, self.batch, self.device = net, batch, device
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
        self.times: list[float] = []

    def forward(self) -> torch.Tensor:
        ids, mask, labels = self.batch
        with self.autocast:
            logits = self.net(input_ids=ids, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    def step(self) -> None:
        self.forward().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_steps(self, n: int) -> None:
        for _ in range(n):
            self.sync()
            t0 = time.perf_counter()
            self.step()
            self.sync()
            self.times.append(time.perf_counter() - t0)

    def memory(self) -> dict:
        own = {t.untyped_storage().data_ptr() for t in [*self.net.parameters(), *self.net.buffers()]}
        loss, act = saved_activation_bytes(self.forward, own)
        loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.opt.step()
        tensors = [
            v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
        ]
        state = sum(v.numel() * v.element_size() for v in tensors)
        self.opt.zero_grad(set_to_none=True)
        weights = sum(p.numel() * p.element_size() for p in self.net.parameters())
        cuda_peak = None
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            self.sync()
            cuda_peak = torch.cuda.max_memory_allocated(self.device) / MB
        return {
            "trainable": sum(p.numel() for p in self.params), "act": act / MB, "grads": grads / MB,
            "state": state / MB, "weights": weights / MB, "total": (weights + grads + state + act) / MB,
            "cuda_peak": cuda_peak,
        }  # fmt: skip


def focus(args) -> list[str]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (args.focus_batch, args.focus_seq), generator=gen).to(device)
    batch = (ids, torch.ones_like(ids), torch.randint(0, 2, (args.focus_batch,), generator=gen).to(device))
    trials: dict[str, Trial] = {}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, overrides in FOCUS:
            net, _, lr = build(method, overrides, Path(tmp))
            trials[label] = trial = Trial(net.to(device).train(), lr, batch, args, device)
            for _ in range(WARMUP):
                trial.step()
            rows[label] = trial.memory()
            print(
                f"{label}: saved activations {rows[label]['act']:.1f} MB, total {rows[label]['total']:.1f} MB",
                flush=True,
            )
    for r in range(args.focus_rounds):  # rounds alternate the methods so that machine noise hits all of them
        for trial in trials.values():
            trial.timed_steps(args.focus_steps)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k} {1000 * statistics.median(t.times):.0f} ms" for k, t in trials.items()),
            flush=True,
        )
    for label, trial in trials.items():
        rows[label]["ms"] = 1000 * statistics.median(trial.times)
    full = rows["full_ft"]
    cuda = args.device == "cuda"
    lines = [
        f"One fixed batch of {args.focus_batch} x {args.focus_seq} random tokens, AdamW; step time = median of "
        f"{args.focus_rounds} alternating rounds x {args.focus_steps} steps (forward, backward, optimizer step) after "
        f"{WARMUP} warm-up steps; {args.device}{' bf16 autocast' if args.bf16 else ' fp32'}"
        + (f", {torch.get_num_threads()} threads" if not cuda else "")
        + ". Memory in MiB, measured tensors (see the script's docstring); x = relative to full fine-tuning.",
        "",
        "| method | trainable params | ms/step (median) | speed-up | saved activations | gradients | AdamW state | weights | "
        "training state total | x less memory" + (" | CUDA peak allocated | x less (CUDA)" if cuda else "") + " |",
        "|---|---|---|---|---|---|---|---|---|---" + ("|---|---" if cuda else "") + "|",
    ]  # fmt: skip
    for label, r in rows.items():
        line = (
            f"| {label} | {r['trainable']:,} | {r['ms']:.1f} | {full['ms'] / r['ms']:.2f}x | {r['act']:.1f} | "
            f"{r['grads']:.1f} | {r['state']:.1f} | {r['weights']:.1f} | {r['total']:.1f} | {full['total'] / r['total']:.2f}x"
        )
        if cuda:
            line += f" | {r['cuda_peak']:.1f} | {full['cuda_peak'] / r['cuda_peak']:.2f}x"
        lines.append(line + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method names")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per method in the zoo")
    ap.add_argument("--train-samples", type=int, default=4000, help="first N SST-2 training sentences")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--focus-batch", type=int, default=32)
    ap.add_argument("--focus-seq", type=int, default=128)
    ap.add_argument("--focus-steps", type=int, default=5, help="timed steps per method and round")
    ap.add_argument("--focus-rounds", type=int, default=3)
    ap.add_argument("--skip-zoo", action="store_true")
    ap.add_argument("--skip-focus", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "experiments/bench/results/peft_zoo.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    command = "python experiments/bench/peft_zoo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = [f"<!-- made by: {command.strip()} -->", f"`{command.strip()}`", ""]
    if not args.skip_zoo:
        known = registered_methods()
        methods = []
        for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if m in known:
                methods.append(m)
            else:
                print(
                    f"skipping method {m!r}: not registered (registered: {', '.join(sorted(known))})",
                    flush=True,
                )
        text += ["## Methods on SST-2", "", *zoo(args, methods), ""]
    if not args.skip_focus:
        text += ["## S2FT training memory and step time", "", *focus(args), ""]
    out = "\n".join(text)
    print(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(out)


if __name__ == "__main__":
    main()
