"""Framework overhead: the same LoRA fine-tuning steps through lightmods and through a hand-written
PyTorch loop with HF PEFT (MiniLM, same batches, same seed, same optimizer and schedule).

    python experiments/bench/overhead.py [--steps 80] [--rounds 2] [--out experiments/bench/results/overhead.md]

Both sides are timed the same way: wall-clock between the ends of consecutive training batches after
``warmup`` batches (data loading, backward, optimizer and scheduler steps included). Rounds alternate
lightmods / hand loop so machine noise hits both; the table reports the median of each side and the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from lightmods.config import register_schemas, validate  # noqa: E402
from lightmods.data import TextClassificationDataModule, get_task  # noqa: E402
from lightmods.models import build_backbone, build_tokenizer  # noqa: E402
from lightmods.modules.task_module import MODEL_INPUTS, NO_DECAY, _lr_lambda  # noqa: E402
from lightmods.run import train  # noqa: E402

WARMUP = 3


def compose_cfg(steps: int, out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=minilm", "method=lora", "logger=csv", "callbacks=none", "callbacks.progress_bar=false",
                f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                "data.max_eval_samples=64",
            ],
            return_hydra_config=True,
        )  # fmt: skip
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out)
    return cfg


def run_lightmods(steps: int, workdir: Path) -> float:
    import json

    out = workdir / f"lightmods_{time.time_ns()}"
    train(compose_cfg(steps, out))
    return json.loads((out / "summary.json").read_text())["train_samples_per_s"]


def run_hand_loop(steps: int, cfg) -> float:
    """A minimal loop a researcher would write with HF PEFT, on the very same batches."""
    from peft import LoraConfig, get_peft_model

    rc = validate(cfg)
    L.seed_everything(rc.seed, workers=True)
    task = get_task(rc.data.task)
    tok = build_tokenizer(rc.model)
    model = build_backbone(rc.model, task, tok)
    m = rc.method
    model = get_peft_model(
        model,
        LoraConfig(r=m.rank, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=["query", "value"],
                   task_type="SEQ_CLS", modules_to_save=["classifier", "pooler"]),
    )  # fmt: skip
    model.train()
    dm = TextClassificationDataModule(task, rc.data, tok, seed=rc.seed)
    dm.setup("fit")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": rc.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=m.lr, betas=tuple(rc.optim.betas), eps=rc.optim.eps,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(rc.optim.scheduler, int(rc.optim.warmup_ratio * steps), steps))
    done, samples, seconds, last, epoch = 0, 0, 0.0, None, 0
    while done < steps:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            now = time.perf_counter()
            done += 1
            if last is not None and done > WARMUP:
                seconds += now - last
                samples += batch["labels"].shape[0]
            last = now
            if done >= steps:
                break
        epoch += 1
    return samples / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "experiments/bench/results/overhead.md"))
    args = ap.parse_args()
    register_schemas()
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict[str, list[float]] = {"lightmods": [], "hand loop + HF PEFT": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            results["lightmods"].append(run_lightmods(args.steps, Path(tmp)))
            results["hand loop + HF PEFT"].append(run_hand_loop(args.steps, compose_cfg(args.steps, Path(tmp) / "hand")))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} samples/s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = [a / b for a, b in zip(results["lightmods"], results["hand loop + HF PEFT"])]
    ratio = statistics.median(ratios)
    table = [
        f"MiniLM-L6 + LoRA (r=8, query/value), demo task, batch 32, {args.steps} steps ({WARMUP} warm-up), "
        f"{args.rounds} alternating rounds, {torch.get_num_threads()} CPU threads, torch {torch.__version__}.",
        "",
        "| loop | samples/s (median) | per round |",
        "|---|---|---|",
        *[f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for k, v in results.items()],
        "",
        f"lightmods / hand loop, per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
        f"median **{ratio:.3f}** (target >= 0.95)",
    ]
    text = "\n".join(table) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"<!-- made by: python experiments/bench/overhead.py --steps {args.steps} --rounds {args.rounds} -->\n" + text)


if __name__ == "__main__":
    main()
