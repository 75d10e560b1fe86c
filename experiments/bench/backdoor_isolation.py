"""What the lexical isolation of ``defense.select=lexical`` flags on the shared SST-2, per attack and threshold,
without training: the suspect tokens, the flagged rows, and their precision / recall against the attack's
poisoned rows (which the defense never reads).

    python experiments/bench/backdoor_isolation.py [--min-shares 0.01,0.005] [--min-purity 0.99] [--seed 42]
        [--out experiments/bench/results/backdoor_isolation.md]
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

from experiments.bench.gs_lora import compose  # noqa: E402

BIBLE = ROOT.parent / "shared" / "data" / "backdoor" / "bible" / "sst-2"
CASES = [  # (attack, its settings)
    ("none", {}),
    ("badnets", {"poison_rate": 0.1}),
    ("badnets", {"poison_rate": 0.05}),
    ("badnets", {"poison_rate": 0.01}),
    ("badnets", {"poison_rate": 0.1, "label_mode": "clean"}),
    ("addsent", {"poison_rate": 0.1}),
    ("addsent", {"poison_rate": 0.01}),
    ("style", {"poison_rate": 0.1, "poisoned_dir": str(BIBLE)}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-shares", default="0.01,0.005", help="defense.lexical_min_share values, comma-separated")
    p.add_argument("--min-purity", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "results" / "backdoor_isolation.md"))
    args = p.parse_args()
    shares = [float(x) for x in args.min_shares.split(",")]
    if not all(0 < s <= 1 for s in shares) or not 0 < args.min_purity <= 1:
        sys.exit(f"--min-shares={args.min_shares} / --min-purity={args.min_purity}: accepted: numbers in (0, 1]")

    from lightmods.attacks.config import AttackConfig
    from lightmods.attacks.isolation import LexicalIsolation, describe_suspects
    from lightmods.attacks.poison import build_poisoner
    from lightmods.config import validate
    from lightmods.data import TextClassificationDataModule
    from lightmods.data.tasks import get_task
    from lightmods.models import build_tokenizer

    rc = validate(compose(["model=minilm", "data=backdoor/sst2", "data.max_length=64"], Path("/tmp/lightmods-isolation")))
    tokenizer, task = build_tokenizer(rc.model), get_task("backdoor/sst2")
    argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--out") and sys.argv[i] != "--out"]
    command = ("python experiments/bench/backdoor_isolation.py " + shlex.join(argv)).strip()
    lines = [
        f"Made by: `{command}`",
        "",
        f"`data=backdoor/sst2` (6,920 training rows), MiniLM tokenizer, max_length 64, seed {args.seed}, "
        f"`defense.lexical_min_purity={args.min_purity:g}`. A token is suspect when it is in >= `min_share` of the "
        "training rows (and >= 10 rows) and >= `min_purity` of those rows carry one label; a row is suspect when it "
        "holds one; \"in\" names the phrase a token grows into (neighbours beside >= 90% of its occurrences), which "
        "`lexical_scrub` deletes. Precision / recall: against the attack's poisoned rows.",
        "",
        "| min_share | attack | poison rate | labels | suspect tokens (rows) | suspect rows | precision | recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for share in shares:
        for name, settings in CASES:
            poisoner = build_poisoner(AttackConfig(name=name, **settings), task, args.seed) if name != "none" else None
            isolation = LexicalIsolation(share, args.min_purity, set(tokenizer.all_special_ids), tokenizer.convert_ids_to_tokens)
            TextClassificationDataModule(task, rc.data, tokenizer, seed=args.seed, attack=poisoner, train_flagger=isolation).setup()
            r = isolation.report
            tokens = ", ".join(describe_suspects(r["suspect_tokens"])) or "none"
            figures = (
                f"{r['suspect_precision']:.3f} | {r['suspect_recall']:.3f}" if "suspect_precision" in r else "n/a | n/a"
            )
            lines.append(
                f"| {share:g} | {name} | {settings.get('poison_rate', '-')} | {settings.get('label_mode', 'dirty') if poisoner else '-'} "
                f"| {tokens} | {r['suspect_rows']} | {figures} |"
            )
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
