"""Can a defense find the poisoned training rows by their representations? Per attack, the signals that
representation-level isolation defenses read, scored against the attack's poisoned rows (never read by a defense).

    python experiments/bench/backdoor_representations.py [--attacks style:0.2,style:0.1,badnets:0.1,addsent:0.1]
        [--runs style:0.2=logs/style/lora,...] [--seed 42] [--threads 1]
        [--out experiments/bench/results/backdoor_representations.md]

For the rows of the label the poisoned rows carry (dirty label: the target), each signal ranks the rows, and the
table gives the ROC AUC of that ranking for "poisoned" (0.5: no better than chance) and, for the 2-means split, the
precision / recall of its smaller cluster (activation clustering, Chen et al. 2018). Signals:

- ``spectral``: the squared projection on the top singular vector of the centred representations (spectral
  signatures, Tran et al. 2018);
- ``knn``: the share of a row's 10 nearest neighbours (cosine) with another label (label-noise detection; a dirty
  label poisoned row keeps the text of its source label);
- ``ce``: the row's cross-entropy under a trained model (the loss view of ``defense.select=low_loss``: lowest first).

Representations: the pretrained backbone's mean-pooled last layer (MiniLM is a sentence-embedding model), and, for
each ``--runs`` entry, the classifier input and logits of that run's exported (poisoned) model. The runs are plain
poisoned trainings, e.g. ``python train.py model=minilm data=backdoor/sst2 method=lora method.lr=0.001
attack=style attack.poison_rate=0.2 trainer.max_steps=400 trainer.max_epochs=1000 trainer.limit_val_batches=0
data.batch_size=32 data.max_length=64 hydra.run.dir=logs/style/lora``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from experiments.bench.gs_lora import compose  # noqa: E402

KNN = 10
BIBLE = ROOT.parent / "shared" / "data" / "backdoor" / "bible" / "sst-2"  # the style attack's files


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the ``positive`` rows: the chance that a positive row scores above a negative one
    (ties count half)."""
    pos, neg = scores[positive][:, None], scores[~positive][None]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def principal_components(x: np.ndarray, k: int) -> np.ndarray:
    """The rows of ``x``, centred, projected on their top ``k`` singular vectors."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T


def spectral_scores(x: np.ndarray) -> np.ndarray:
    return principal_components(x, 1)[:, 0] ** 2


def two_means_smaller(x: np.ndarray, seed: int, iters: int = 50) -> np.ndarray:
    """The smaller cluster of a 2-means split of the top-10 principal components (k-means++ start)."""
    z = principal_components(x, 10)
    rng = np.random.default_rng(seed)
    first = z[rng.integers(len(z))]
    d = ((z - first) ** 2).sum(1)
    centres = np.stack([first, z[rng.choice(len(z), p=d / d.sum())]])
    for _ in range(iters):
        assign = ((z[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([z[assign == c].mean(0) if (assign == c).any() else centres[c] for c in (0, 1)])
    return assign == np.bincount(assign, minlength=2).argmin()


def knn_disagreement(x: np.ndarray, labels: np.ndarray, k: int = KNN) -> np.ndarray:
    """For every row, the share of its ``k`` nearest rows (cosine, over all labels) with another label."""
    unit = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).float()
    y = torch.from_numpy(labels)
    out = torch.empty(len(unit))
    for i in range(0, len(unit), 1024):
        sim = unit[i : i + 1024] @ unit.T
        sim[torch.arange(sim.shape[0]), torch.arange(i, i + sim.shape[0])] = -2.0
        nn = sim.topk(k, dim=1).indices
        out[i : i + 1024] = (y[nn] != y[i : i + 1024, None]).float().mean(1)
    return out.numpy()


def encode(model, rows: list[list[int]], pad_id: int, batch: int = 256) -> dict[str, np.ndarray]:
    """Mean-pooled last hidden state, the classifier's input and the logits of ``rows`` (token id lists)."""
    pooled, head_in, logits = [], [], []
    classifier = getattr(model, "classifier", None)
    hook = classifier.register_forward_hook(lambda m, i, o: head_in.append(i[0].detach())) if classifier is not None else None
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            ids = torch.full((len(chunk), max(map(len, chunk))), pad_id)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(chunk):
                ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            h = out.hidden_states[-1]
            pooled.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
            if hasattr(out, "logits"):
                logits.append(out.logits)
    if hook is not None:
        hook.remove()
    reps = {"pooled": torch.cat(pooled).numpy()}
    if head_in:
        reps["classifier_in"] = torch.cat(head_in).reshape(len(rows), -1).numpy()
    if logits:
        reps["logits"] = torch.cat(logits).numpy()
    return reps


def attack_and_rate(text: str) -> tuple[str, float] | None:
    """``attack:rate`` as ``(attack, rate)``; None when it is not one."""
    name, _, rate = text.partition(":")
    try:
        value = float(rate)
    except ValueError:
        return None
    return (name, value) if name in ("badnets", "addsent", "style") and 0 < value < 1 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attacks", default="style:0.2,style:0.1,badnets:0.1,addsent:0.1", help="attack:poison_rate, comma-separated")
    p.add_argument("--runs", default="", help="attack:poison_rate=run_dir (a poisoned training's run directory; several per attack allowed), comma-separated")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "results" / "backdoor_representations.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [attack_and_rate(item) for item in filter(None, args.attacks.split(","))]
    if None in cases:
        bad = next(i for i, c in zip(filter(None, args.attacks.split(",")), cases) if c is None)
        sys.exit(f"--attacks={args.attacks}: {bad!r}; accepted: badnets|addsent|style:<poison rate in (0, 1)>, comma-separated")
    runs: dict[tuple[str, float], list[Path]] = {}
    for item in filter(None, args.runs.split(",")):
        key, _, run = item.partition("=")
        if not (Path(run) / "export").is_dir() or attack_and_rate(key) not in cases:
            sys.exit(f"--runs={args.runs}: {item!r}; accepted: <one of --attacks>=<a run directory with export/>")
        runs.setdefault(attack_and_rate(key), []).append(Path(run))

    from lightmods.attacks.config import AttackConfig
    from lightmods.attacks.poison import build_poisoner
    from lightmods.config import validate
    from lightmods.data import TextClassificationDataModule
    from lightmods.data.tasks import get_task
    from lightmods.export import load_export
    from lightmods.models import build_backbone, build_tokenizer

    rc = validate(compose(["model=minilm", "data=backdoor/sst2", "data.max_length=64"], Path("/tmp/lightmods-representations")))
    tokenizer, task = build_tokenizer(rc.model), get_task("backdoor/sst2")
    pretrained = build_backbone(rc.model, task, tokenizer).eval()
    argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--out") and sys.argv[i] != "--out"]
    command = ("python experiments/bench/backdoor_representations.py " + shlex.join(argv)).strip()
    lines = [
        f"Made by: `{command}`",
        "",
        f"`data=backdoor/sst2` (6,920 training rows), MiniLM tokenizer, max_length 64, dirty label, seed {args.seed}. "
        "AUC: how well a signal ranks the poisoned rows first among the rows of their label (0.5: chance; the rows "
        f"with the lowest cross-entropy first for `ce`); `knn`: share of the {KNN} nearest rows with another label; "
        "2-means: precision / recall of the smaller cluster (chance precision: the poisoned share of the label's rows). `pretrained`: MiniLM's mean-pooled last layer before any "
        "training; the other rows: the exported model of the poisoned run named.",
        "",
        "| attack | rate | representation | spectral AUC | knn AUC | ce AUC | 2-means precision / recall | chance precision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rate in cases:
        settings = {"poison_rate": rate} | ({"poisoned_dir": str(BIBLE)} if name == "style" else {})
        poisoner = build_poisoner(AttackConfig(name=name, **settings), task, args.seed)
        seen: dict = {}

        def capture(features, seen=seen):
            seen.update({k: list(v) for k, v in features.items()})
            return [0] * len(features["input_ids"])

        TextClassificationDataModule(task, rc.data, tokenizer, seed=args.seed, attack=poisoner, train_flagger=capture).setup()
        labels, poisoned = np.array(seen["labels"]), np.array(seen["poisoned"], dtype=bool)
        target = int(np.bincount(labels[poisoned]).argmax())
        mine = labels == target
        models = [("pretrained", pretrained)] + [(f"`{run}`", load_export(run / "export")) for run in runs.get((name, rate), [])]
        for label, model in models:
            reps = encode(model, seen["input_ids"], tokenizer.pad_token_id)
            ce = None
            if label != "pretrained" and "logits" in reps:
                ce = F.cross_entropy(torch.from_numpy(reps["logits"]), torch.from_numpy(labels), reduction="none").numpy()
            for rep, x in reps.items():
                if label == "pretrained" and rep != "pooled":
                    continue  # an untrained head says nothing
                knn = knn_disagreement(x, labels)
                small = two_means_smaller(x[mine], args.seed)
                hit = small & poisoned[mine]
                lines.append(
                    f"| {name} | {rate:g} | {label} {rep} | {auc(spectral_scores(x[mine]), poisoned[mine]):.3f} "
                    f"| {auc(knn[mine], poisoned[mine]):.3f} | {auc(-ce[mine], poisoned[mine]) if ce is not None else float('nan'):.3f} "
                    f"| {hit.sum() / max(1, small.sum()):.2f} / {hit.sum() / poisoned.sum():.2f} | {poisoned[mine].mean():.2f} |"
                )
                print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
