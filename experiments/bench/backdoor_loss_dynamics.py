"""Can a defense tell poisoned training rows by their loss? The per-row loss of a fixed probe set of poisoned
training rows over the first steps of a fine-tuning on a poisoned training set.

    python experiments/bench/backdoor_loss_dynamics.py [--method full_ft] [--attack badnets|addsent|style] [--poison-rate 0.1]
        [--steps 120] [--schedule-steps 400] [--probe-rows 512] [--ratio 0.1] [--seed 42]
        [--out experiments/bench/results/backdoor_loss_dynamics.md]

Every selection a loss-based defense could make (``defense.select=low_loss``, anti-backdoor learning's isolation
of the fastest-fit rows, or the label-noise view that poisoned rows have the highest loss because their labels
contradict their text) rests on poisoned rows standing out by loss at some step. At each probed step this
reports, over the probe rows: clean-row accuracy, the share of poisoned rows predicted as the target, the mean
cross-entropy of clean and of poisoned rows, and the precision (poisoned share) of the ``--ratio`` rows with the
lowest loss, the highest loss, the largest drop since step 0, and the largest relative drop. A random selection
has precision equal to the poison rate.

The fine-tuning is the run's own pieces (``model=minilm``, ``data=backdoor/sst2``, the attack's poisoner, the
method's trainable parameters, AdamW with ``method.lr`` and the run's linear warm-up/decay schedule over
``--schedule-steps``, the benchmark's 400 by default) in a plain loop, so that the probe can be evaluated between
steps; batches are the data module's shuffled training batches.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from experiments.bench.gs_lora import compose  # noqa: E402

LR = {"lora": 1e-3, "full_ft": 3e-5}  # the backdoor benchmark's
PROBE_AT = (0, 2, 5, 10, 20, 30, 40, 50, 60, 80, 100, 120, 160, 200, 300, 400)


def build(args):
    """The model (with the method applied), its data module over the poisoned training set, and the run config."""
    from lightmods.attacks.suite import BackdoorSuite
    from lightmods.config import validate
    from lightmods.data import TextClassificationDataModule
    from lightmods.data.tasks import get_task
    from lightmods.methods import build_method
    from lightmods.models import build_backbone, build_tokenizer, family_of

    cfg = compose(
        [
            "model=minilm", "data=backdoor/sst2", f"method={args.method}", f"method.lr={LR[args.method]}",
            f"attack={args.attack}", f"attack.poison_rate={args.poison_rate}", f"seed={args.seed}",
            f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}",
        ],  # fmt: skip
        Path("/tmp/lightmods-loss-dynamics"),
    )
    rc = validate(cfg)
    torch.manual_seed(args.seed)
    task = get_task(rc.data.task)
    tokenizer = build_tokenizer(rc.model)
    method = build_method(rc.method)
    backbone = build_backbone(rc.model, task, tokenizer)
    model = method.prepare(backbone, family_of(backbone))
    poisoner = BackdoorSuite(rc.attack, rc.defense, task, seed=args.seed).poisoner
    dm = TextClassificationDataModule(task, rc.data, tokenizer, seed=args.seed, tokenizer_id=rc.model.name_or_path, attack=poisoner)
    dm.setup()
    return model, dm, rc


def precision(keys: torch.Tensor, poisoned: torch.Tensor, ratio: float) -> float:
    """Poisoned share of the ``ratio`` rows with the smallest ``keys``."""
    k = max(1, int(ratio * len(keys)))
    return float(poisoned[torch.argsort(keys, stable=True)[:k]].float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="full_ft", choices=sorted(LR))
    p.add_argument("--attack", default="badnets", choices=("badnets", "addsent", "style"))
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps to follow")
    p.add_argument("--schedule-steps", type=int, default=400, help="the length the learning-rate schedule is set for")
    p.add_argument("--probe-rows", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.1, help="share of the probe rows each selection takes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "results" / "backdoor_loss_dynamics.md"))
    args = p.parse_args()
    if not 0 < args.ratio <= 1:
        sys.exit(f"--ratio={args.ratio}: accepted: a number in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightmods.modules.task_module import _lr_lambda

    started = time.perf_counter()
    model, dm, rc = build(args)
    train = dm.datasets["train"]
    collate = dm.train_dataloader().collate_fn
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.probe_rows].tolist()
    probe = collate([train[i] for i in rows])
    poisoned = probe["poisoned"].bool()
    inputs = {k: probe[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in probe}
    target = int(probe["labels"][poisoned][0]) if bool(poisoned.any()) else None

    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=rc.method.lr, weight_decay=rc.optim.weight_decay, betas=tuple(rc.optim.betas))
    warmup = int(rc.optim.warmup_ratio * args.schedule_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(rc.optim.scheduler, warmup, args.schedule_steps))

    def probe_losses():
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        model.train()
        return F.cross_entropy(logits.float(), probe["labels"], reduction="none"), logits.argmax(-1)

    table = []
    ce0, _ = probe_losses()
    batches = iter(())
    model.train()
    for step in range(args.steps + 1):
        if step in PROBE_AT or step == args.steps:
            ce, pred = probe_losses()
            clean = ~poisoned
            table.append((
                step,
                float((pred[clean] == probe["labels"][clean]).float().mean()),
                float((pred[poisoned] == target).float().mean()) if target is not None else float("nan"),
                float(ce[clean].mean()), float(ce[poisoned].mean()),
                precision(ce, poisoned, args.ratio), precision(-ce, poisoned, args.ratio),
                precision(ce - ce0, poisoned, args.ratio), precision(ce / ce0, poisoned, args.ratio),
            ))  # fmt: skip
            print("step {}: clean acc {:.3f}, poisoned->target {:.3f}, CE clean {:.3f} poisoned {:.3f}, precision low {:.2f} high {:.2f} drop {:.2f} rel. drop {:.2f}".format(*table[-1]), flush=True)
        if step == args.steps:
            break
        batch = next(batches, None)
        if batch is None:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        logits = model(**{k: batch[k] for k in inputs}).logits
        F.cross_entropy(logits.float(), batch["labels"]).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--out") and sys.argv[i] != "--out"]
    command = "python experiments/bench/backdoor_loss_dynamics.py " + shlex.join(argv)
    lines = [
        f"Made by: `{command.strip()}`",
        "",
        f"MiniLM-L6, `data=backdoor/sst2` ({len(train)} training rows), `method={args.method}` (lr {rc.method.lr:g}, "
        f"AdamW, linear schedule set for {args.schedule_steps} steps), `attack={args.attack}` (poison rate "
        f"{args.poison_rate:g}, dirty label), batch {args.batch_size}, max_length {args.max_length}, seed {args.seed}. "
        f"Probe: {len(rows)} random training rows, {int(poisoned.sum())} of them poisoned. Precision columns: the poisoned "
        f"share of the {args.ratio:g} probe rows a selection takes (random: {float(poisoned.float().mean()):.2f}).",
        "",
        "| step | clean-row acc | poisoned rows -> target | CE clean | CE poisoned | precision: lowest loss | highest loss | largest drop | largest relative drop |",
        "|---|---|---|---|---|---|---|---|---|",
        *("| {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} |".format(*r) for r in table),
        "",
        f"Wall time {time.perf_counter() - started:.0f} s.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
