"""EViT: inference throughput vs keep rate on a DeiT-S-sized ViT, and accuracy vs keep rate on tiny_vit.

    nice -n 10 python experiments/bench/evit.py [--threads 1] [--batch 64] [--repeats 5] [--keep-rates 1.0,0.9,0.7,0.5]
        [--epochs 6] [--seeds 1,2] [--fresh] [--out experiments/bench/results/evit.md]

1. Throughput: a randomly initialised ViT of DeiT-S's shape (224px, patch 16, 12 layers, 384 wide, 6 heads,
   FFN 1536, 1000 classes; ``model.init=random``, nothing downloaded), prepared by ``method=evit`` with its
   default placement (layers 3, 6, 9 = the paper's blocks 4, 7, 10) and token fusion. One model: each keep rate
   is set on the same weights, and the keep rates are timed round-robin (``--repeats`` rounds of one batch
   of ``--batch`` images each, eval mode, ``torch.no_grad``, after one warm-up batch each), so machine load
   hits them alike; the median images/s per keep rate and its ratio to keep rate 1.0 are reported, next to the
   analytic GMACs (``lightmods.methods.evit.vit_flops`` / 2) and the plain transformers ViT for reference.
2. Accuracy: ``python train.py model=tiny_vit data=images/synthetic method=evit method.keep_rate=<r>``
   (full training from random init, ``--epochs`` epochs, lr 1e-3, cosine keep-rate warm-up over the first
   epoch), with and without fusing the inattentive tokens, for each seed; validation accuracy at the target
   keep rate. A run whose ``metrics.json`` exists under ``experiments/bench/_runs/evit`` is reused (``--fresh``
   retrains).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEIT_S = {"model_type": "vit", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
          "intermediate_size": 1536, "image_size": 224, "patch_size": 16, "num_channels": 3}  # fmt: skip
PAPER = {1.0: ("79.8 (DeiT-S)", "4.6"), 0.9: ("79.8", "4.0"), 0.7: ("79.5", "3.0"), 0.5: ("78.5", "2.3")}  # top-1, GMACs


def build_deit_s(num_labels: int = 1000):
    from transformers import AutoConfig, ViTForImageClassification

    arch = dict(DEIT_S)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch, num_labels=num_labels)
    torch.manual_seed(0)
    return ViTForImageClassification(config).eval()


@torch.no_grad()
def throughput(args) -> list[dict]:
    from lightmods.methods.evit import EViT, EViTConfig, vit_flops
    from lightmods.models.families import FAMILIES
    from lightmods.tokens import token_counts, wrap_vit_layers

    plain = build_deit_s()
    model = build_deit_s()
    method = EViT(EViTConfig(keep_rate=1.0))
    model = method.prepare(model, FAMILIES["vit"]).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    variants = [("plain ViT", None)] + [(f"EViT {r}", r) for r in args.keep_rates]

    def run(rate):
        if rate is None:
            return plain(pixel_values=x)
        wrap_vit_layers(model, method.layers, rate)
        return model(pixel_values=x)

    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _, rate in variants:  # warm-up
        run(rate)
    for i in range(args.repeats):
        for name, rate in variants:
            start = time.perf_counter()
            run(rate)
            times[name].append(time.perf_counter() - start)
        print(f"round {i + 1}/{args.repeats}: " + ", ".join(f"{n} {args.batch / t[-1]:.2f}" for n, t in times.items()), flush=True)
    cfg = model.config
    patches = (cfg.image_size // cfg.patch_size) ** 2
    rows = []
    base = f"EViT {1.0}"
    for name, rate in variants:
        counts = token_counts(patches, cfg.num_hidden_layers, method.layers if rate else [], rate or 1.0)
        rows.append({
            "name": name, "rate": rate, "ips": args.batch / min(times[name]), "gmacs": vit_flops(cfg, counts) / 2e9,
            "tokens": counts, "ratio": statistics.median(b / t for t, b in zip(times[name], times[base])),
            "ratio_best": min(times[base]) / min(times[name]),
        })  # fmt: skip
    return rows


def accuracy(args) -> list[dict]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lightmods.config import register_schemas
    from lightmods.run import train

    register_schemas()
    rows = []
    settings = [(r, True) for r in args.keep_rates] + [(r, False) for r in args.keep_rates if r < 1]
    for rate, fuse in settings:
        scores = []
        for seed in args.seeds:
            overrides = [
                "model=tiny_vit", "data=images/synthetic", "method=evit", f"method.keep_rate={rate}",
                f"method.fuse_inattentive={str(fuse).lower()}", "method.lr=1e-3", f"seed={seed}",
                f"trainer.max_epochs={args.epochs}", "callbacks.progress_bar=false", "callbacks.checkpoint.save_top_k=0",
                "callbacks.checkpoint.save_last=false", "logger=none",
            ]  # fmt: skip
            run_dir = ROOT / "experiments/bench/_runs/evit" / f"k{rate}_fuse{int(fuse)}_s{seed}_e{args.epochs}"
            if not args.fresh and (run_dir / "metrics.json").exists():
                scores.append(json.loads((run_dir / "metrics.json").read_text())["val/accuracy"])
                print(f"reusing {run_dir}: {scores[-1]:.4f}", flush=True)
                continue
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
                cfg.paths.output_dir = str(run_dir)
            scores.append(train(cfg)["val/accuracy"])
            print(f"keep {rate} fuse {fuse} seed {seed}: {scores[-1]:.4f}", flush=True)
        rows.append({"rate": rate, "fuse": fuse, "scores": scores, "mean": statistics.mean(scores)})
    return rows


def write(args, tp: list[dict], acc: list[dict], wall: float) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    cmd = f"nice -n 10 python experiments/bench/evit.py --threads {args.threads} --batch {args.batch} --repeats {args.repeats} " \
          f"--keep-rates {','.join(map(str, args.keep_rates))} --epochs {args.epochs} --seeds {','.join(map(str, args.seeds))}"  # fmt: skip
    lines = [
        "# EViT: throughput and accuracy vs keep rate", "", f"Command: `{cmd}`", "",
        f"Machine: {cpu}, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__} on CPU, "
        f"{args.threads} thread(s); wall time {wall / 60:.1f} min. Every number below was measured by this run.", "",
        "## Throughput (eval mode) on a DeiT-S-sized ViT", "",
        f"Random-init ViT, 224px, patch 16 (196 patches), 12 layers, 384 wide, 6 heads; EViT in layers 3, 6, 9 (0-based; "
        f"the paper's blocks 4, 7, 10) with token fusion; batch {args.batch}, {args.repeats} round-robin rounds. "
        "images/s: the fastest of the rounds (the least disturbed by other jobs on the machine); vs keep 1.0: the median over "
        "rounds of the ratio within a round (the variants of a round run back to back), and the ratio of the fastest rounds. "
        "GMACs: analytic matmul count per image (`vit_flops` / 2). Paper columns: EViT-DeiT-S model zoo (ImageNet top-1, "
        "GMACs; its GPU figure is +50% images/s at keep 0.7).", "",
        "| model | keep rate | tokens after layers 3 / 6 / 9 | GMACs | images/s | vs keep 1.0 (median / fastest) | paper GMACs | paper top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in tp:
        rate = r["rate"] if r["rate"] is not None else 1.0
        paper = PAPER.get(rate, ("", "")) if r["rate"] is not None else ("", "")
        t = r["tokens"]
        lines.append(f"| {r['name']} | {rate} | {t[3]} / {t[6]} / {t[9]} | {r['gmacs']:.2f} | {r['ips']:.2f} | {r['ratio']:.2f}x / {r['ratio_best']:.2f}x | {paper[1]} | {paper[0]} |")
    lines += [
        "", "## Accuracy on images/synthetic (tiny_vit)", "",
        f"`model=tiny_vit` (2 layers, 32 wide, 16 patches; EViT in layers 0 and 1), trained from random init for {args.epochs} "
        f"epochs on 512 images, 256 validation images, lr 1e-3, keep rate warmed up (cosine) over the first epoch; "
        f"validation accuracy at the target keep rate, seeds {', '.join(map(str, args.seeds))}.", "",
        "| keep rate | inattentive tokens | tokens after layers 0 / 1 | accuracy per seed | mean |", "|---|---|---|---|---|",
    ]  # fmt: skip
    from lightmods.tokens import token_counts

    for r in acc:
        t = token_counts(16, 2, [0, 1], r["rate"], r["fuse"])
        lines.append(f"| {r['rate']} | {'fused' if r['fuse'] else 'dropped'} | {t[0]} / {t[1]} | "
                     f"{', '.join(f'{s:.4f}' for s in r['scores'])} | {r['mean']:.4f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep-rates", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 0.9, 0.7, 0.5])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/evit.md"))
    p.add_argument("--fresh", action="store_true", help="retrain accuracy runs whose metrics.json exists")
    args = p.parse_args()
    if 1.0 not in args.keep_rates:
        p.error("--keep-rates must include 1.0 (the reference of the ratios)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tp = throughput(args)
    acc = accuracy(args)
    write(args, tp, acc, time.perf_counter() - started)


if __name__ == "__main__":
    main()
