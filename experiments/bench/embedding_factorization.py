"""What COST-EFF's low-rank word embedding costs a fine-tuned model before any retraining: the teacher's dev
accuracy with its word embedding replaced by a rank-r factorisation, from the plain SVD (the paper's), from the
SVD weighted by token counts in the training split (``method.emb_svd_weights=token_frequency``), and from the
weighted SVD of the rows of the training split's tokens only, the others reading [UNK]'s
(``method.emb_vocab=train``, far fewer parameters at the same rank), per rank.

    python experiments/bench/embedding_factorization.py --teacher logs/ce/teacher/export [--ranks 24,48,96,192]
        [--out experiments/bench/results/embedding_factorization.md]

The teacher is an ``export/`` of ``method=full_ft`` on a classification task (its run config names the task and
data folder; run from the repository root). No training: each row swaps the embedding matrix for its rank-r approximation and evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WEIGHTINGS = ("none", "token_frequency")


def accuracy(model, loader) -> float:
    import torch

    right = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            right += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += len(labels)
    return 100.0 * right / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="export/ folder of a fine-tuned classification model")
    p.add_argument("--ranks", default="24,48,96,192", help="embedding ranks, comma-separated")
    p.add_argument(
        "--min-count", type=int, default=1,
        help="the kept-rows columns keep the tokens seen at least this often in training (method.emb_min_count)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "results" / "embedding_factorization.md"))
    args = p.parse_args()
    teacher = Path(args.teacher)
    if not (teacher / "lightmods.json").is_file():
        sys.exit(f"--teacher={args.teacher}: no lightmods.json there; accepted: the export/ folder of a finished run")
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        sys.exit(f"--ranks={args.ranks}: accepted: positive integers, comma-separated")
    if not ranks or min(ranks) < 1:
        sys.exit(f"--ranks={args.ranks}: accepted: positive integers, comma-separated")
    if args.min_count < 1:
        sys.exit(f"--min-count={args.min_count}: accepted: an integer >= 1")

    import torch

    from lightmods.config import validate
    from lightmods.data import TextClassificationDataModule
    from lightmods.data.tasks import get_task
    from lightmods.export import load_export
    from lightmods.models import build_tokenizer
    from lightmods.structure.embedding import (
        kept_token_ids,
        low_rank_factors,
        nearest_kept_ids,
        token_weights,
        trimmed_rows,
        word_embedding_owner,
    )

    torch.set_num_threads(args.threads)
    from omegaconf import OmegaConf

    run = json.loads((teacher / "lightmods.json").read_text())["config"]
    rc = validate(OmegaConf.create(run))  # the teacher's own model and data settings (data_dir relative to the root)
    task = get_task(rc.data.task)
    model = load_export(teacher).eval()
    dm = TextClassificationDataModule(task, rc.data, build_tokenizer(rc.model), seed=0)
    dm.setup()
    split = next(iter(task.eval_splits))
    loader = dm.eval_dataloader(split)
    owner, attr = word_embedding_owner(model)
    emb = getattr(owner, attr)
    original = emb.weight.detach().clone()
    train_ids = dm.datasets["train"].features["input_ids"]
    weights = {"none": None, "token_frequency": token_weights(train_ids, emb.num_embeddings)}
    used = int((weights["token_frequency"] > 1).sum())
    seen = weights["token_frequency"] > 1
    eval_ids = [t for ids in dm.datasets[split].features["input_ids"] for t in ids]
    unseen = sum(1 for t in eval_ids if not seen[t]) / len(eval_ids)

    tok = dm.tokenizer
    kept = kept_token_ids(train_ids, {*tok.all_special_ids, tok.unk_token_id}, emb.num_embeddings, args.min_count)
    kept_rows = torch.nn.Embedding.from_pretrained(original[kept])
    fallbacks = {  # the row of the kept table each token id reads
        "unk": trimmed_rows(kept, tok.unk_token_id, emb.num_embeddings),
        "nearest": trimmed_rows(kept, nearest_kept_ids(original, kept), emb.num_embeddings),
    }

    def trimmed(rows: torch.Tensor, fallback: str) -> torch.Tensor:
        """The V x H matrix a trimmed embedding reads: the kept ids their row, every other id [UNK]'s or
        (nearest) that of the kept id whose original row is the most cosine-similar."""
        return rows[fallbacks[fallback]]

    def evaluate(matrix: torch.Tensor) -> float:
        emb.weight.data.copy_(matrix.to(original.dtype))
        acc = accuracy(model, loader)
        emb.weight.data.copy_(original)
        return acc

    full = accuracy(model, loader)
    full_trimmed = {f: evaluate(trimmed(original[kept], f)) for f in fallbacks}
    rows = []
    for r in ranks:
        accs = []
        for how in WEIGHTINGS:
            e1, e2 = low_rank_factors(emb, r, weights[how])
            accs.append(evaluate(e1 @ e2))
        e1, e2 = low_rank_factors(kept_rows, r, weights["token_frequency"][kept])
        accs += [evaluate(trimmed(e1 @ e2, f)) for f in fallbacks]
        params = r * (emb.num_embeddings + emb.embedding_dim)
        params_kept = r * (len(kept) + emb.embedding_dim)
        rows.append(
            f"| {r} | {params / 1e6:.2f}M | {accs[0]:.2f} | {accs[1]:.2f} | {accs[1] - accs[0]:+.2f} | "
            f"{params_kept / 1e6:.2f}M | {accs[2]:.2f} | {accs[3]:.2f} |"
        )
        print(rows[-1], flush=True)

    argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--out") and sys.argv[i] != "--out"]
    lines = [
        "# What the low-rank word embedding costs before retraining",
        "",
        f"Made by: `{('python experiments/bench/embedding_factorization.py ' + shlex.join(argv)).strip()}`",
        "",
        f"Teacher: `{teacher}` ({rc.data.task}, {rc.model.name_or_path}), {split} accuracy {full:.2f} with its "
        f"{emb.num_embeddings:,} x {emb.embedding_dim} word embedding ({emb.num_embeddings * emb.embedding_dim / 1e6:.2f}M "
        f"parameters). The training split uses {used:,} of the {emb.num_embeddings:,} token ids; "
        f"{100 * unseen:.2f}% of the {split} split's tokens are not among them. Each row replaces the embedding by "
        "its best rank-r approximation, plain or weighted by each token's count in the training split (+1), and "
        "evaluates without any retraining. The last three columns keep only the rows of the "
        f"{len(kept):,} token ids (with the special tokens) seen at least {args.min_count} time(s) in the training "
        f"split (`method.emb_min_count={args.min_count}`), the other ids reading [UNK]'s row "
        "(`method.emb_vocab=train`) or that of the kept id nearest to them by cosine similarity in the unfactorised "
        "embedding (`method.emb_fallback=nearest`); unfactorised those score "
        f"{full_trimmed['unk']:.2f} and {full_trimmed['nearest']:.2f}; each row factorises the kept rows with the "
        "weighted SVD.",
        "",
        f"| rank | factor parameters | {split} acc, plain SVD (COST-EFF) | weighted by token counts | difference | "
        "kept rows only: parameters | accuracy, [UNK] fallback | accuracy, nearest fallback |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
