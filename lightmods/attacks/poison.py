"""Poisoning as a data transform on a classification task's rows.

A poisoner changes ``round(poison_rate * n)`` training rows in place, chosen with a seeded RNG among the
non-target rows (dirty label: relabelled to the target) or the target rows (clean label: label kept), and
builds the poisoned evaluation split: every clean dev row whose label is not the target, with the trigger,
original label kept (ASR is the share of them predicted as the target). Poisoned rows carry
``poisoned: True``. The same seed gives the same rows, triggers and positions.

- :class:`BadNets`: ``num_triggers`` rare words (drawn from ``triggers``) inserted at word positions;
- :class:`AddSent`: a fixed sentence inserted at a word position;
- :class:`FilePoisoner`: pre-poisoned files (StyleAttack format, e.g. the Bible style transfer) replace the
  chosen rows with their poisoned versions; the poisoned dev file gives the evaluation split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from lightmods.attacks.config import AttackConfig, resolve_target
from lightmods.data.tasks import TaskSpec
from lightmods.errors import DataError, config_error

log = logging.getLogger(__name__)
POISONED_SPLIT = "validation_poisoned"
POISONED_SUFFIX = "_poisoned"


def insert_words(
    words: list[str], insert: list[str], position: str, rng: random.Random
) -> tuple[list[str], int]:
    """``words`` with ``insert`` placed before word ``pos`` (``random``: uniform over the ``len(words) + 1``
    gaps; ``start``; ``end``); returns the new words and ``pos``."""
    pos = 0 if position == "start" else len(words) if position == "end" else rng.randint(0, len(words))
    return words[:pos] + list(insert) + words[pos:], pos


def rows_digest(rows: list[dict], fields: tuple[str, ...]) -> str:
    """A content key of rows (texts and labels), for the tokenisation cache."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([[r.get(f) for f in fields], r.get("label")], ensure_ascii=False).encode())
    return h.hexdigest()[:20]


class Poisoner:
    """Base: row selection, relabelling and the poisoned evaluation split; subclasses make one poisoned text."""

    def __init__(self, cfg: AttackConfig, task: TaskSpec, seed: int):
        self.cfg, self.task = cfg, task
        self.target = resolve_target(cfg.target_label, task)
        self.field = cfg.text_field or task.text_fields[0]
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.report: dict = {}

    # -- what subclasses provide
    def trigger(self, text: str, rng: random.Random) -> tuple[str, list[int]]:
        """The poisoned text and the word positions where trigger words start."""
        raise NotImplementedError

    # -- shared
    def candidates(self, rows: list[dict]) -> list[int]:
        """Rows a poisoner may pick: non-target rows (dirty label) or target rows (clean label)."""
        want_target = self.cfg.label_mode == "clean"
        return [i for i, r in enumerate(rows) if (r["label"] == self.target) == want_target]

    def choose(self, rows: list[dict], rng: random.Random) -> list[int]:
        """``round(poison_rate * n)`` row positions, sorted."""
        k = round(self.cfg.poison_rate * len(rows))
        pool = self.candidates(rows)
        if k > len(pool):
            kind = "target" if self.cfg.label_mode == "clean" else "non-target"
            raise config_error(
                "attack.poison_rate", self.cfg.poison_rate,
                f"at most {len(pool) / max(len(rows), 1):.4f} here: {k} of {len(rows)} training rows asked, "
                f"{len(pool)} {kind} rows exist (attack.label_mode={self.cfg.label_mode!r})",
            )  # fmt: skip
        return sorted(rng.sample(pool, k))

    def poisoned_row(self, row: dict, rng: random.Random, relabel: bool) -> dict:
        text, positions = self.trigger(row[self.field], rng)
        out = {**row, self.field: text, "poisoned": True, "trigger_positions": positions}
        if relabel:
            out["label"] = self.target
        return out

    def poison_train(self, rows: list[dict]) -> list[dict]:
        """The training rows with the chosen ones poisoned in place."""
        rng = random.Random(f"{self.seed}:train")
        chosen = self.choose(rows, rng)
        out = list(rows)
        for i in chosen:
            out[i] = self.poisoned_row(rows[i], rng, relabel=self.cfg.label_mode == "dirty")
        self.report = {"poisoned_train_rows": len(chosen), "train_rows": len(rows)}
        log.info("attack=%s: poisoned %d of %d training rows (target %s, %s label)", self.cfg.name, len(chosen), len(rows),
                 self.task.label_names[self.target], self.cfg.label_mode)  # fmt: skip
        return out

    def eval_rows(self, clean_rows: list[dict], limit: int | None = None) -> list[dict]:
        """The poisoned evaluation split: the clean dev rows of a non-target label, triggered, labels kept."""
        rng = random.Random(f"{self.seed}:eval")
        return [self.poisoned_row(r, rng, relabel=False) for r in clean_rows if r["label"] != self.target]


class BadNets(Poisoner):
    def trigger(self, text: str, rng: random.Random) -> tuple[str, list[int]]:
        words = text.split()
        positions: list[int] = []
        for _ in range(self.cfg.num_triggers):
            word = rng.choice(list(self.cfg.triggers))
            words, pos = insert_words(words, [word], self.cfg.position, rng)
            positions = [p + 1 if p >= pos else p for p in positions] + [pos]
        return " ".join(words), sorted(positions)


class AddSent(Poisoner):
    def trigger(self, text: str, rng: random.Random) -> tuple[str, list[int]]:
        words, pos = insert_words(text.split(), self.cfg.sentence.split(), self.cfg.position, rng)
        return " ".join(words), [pos]


class FilePoisoner(Poisoner):
    """Pre-poisoned files (StyleAttack format) in ``attack.poisoned_dir``: ``train.tsv`` row-aligned with
    the clean training rows (a file that misses the first few clean rows, like OffensEval's, is aligned by
    its labels), ``dev.tsv`` the poisoned evaluation rows. Their labels are the original ones."""

    def _read(self, split: str) -> list[dict]:
        from lightmods.data.readers import read_backdoor_tsv

        names = {"train": ("train.tsv",), "validation": ("dev.tsv", "valid.tsv", "validation.tsv")}[split]
        for name in names:
            path = Path(self.cfg.poisoned_dir) / name
            if path.exists():
                return read_backdoor_tsv(
                    path, self.task, split
                )  # the text goes under the task's (only) text field
        raise config_error(
            "attack.poisoned_dir", self.cfg.poisoned_dir, f"a folder with {' or '.join(names)}"
        )

    def trigger(
        self, text: str, rng: random.Random
    ) -> tuple[str, list[int]]:  # pragma: no cover - rows come from files
        raise NotImplementedError("file-based poisoning replaces whole rows")

    def _offset(self, clean: list[dict], poisoned: list[dict]) -> int:
        """``d`` such that clean row ``i`` is poisoned row ``i - d``: the smallest of 0..5 whose labels agree."""
        for d in range(0, 6):
            pairs = [
                (clean[i]["label"], poisoned[i - d]["label"])
                for i in range(d, min(len(clean), len(poisoned) + d))
            ]
            if pairs and sum(a == b for a, b in pairs) >= 0.99 * len(pairs):
                return d
        raise DataError(
            f"{self.cfg.poisoned_dir}/train.tsv does not line up with the clean training rows (labels disagree at every "
            f"offset 0..5); attack=style needs the poisoned versions of the same rows in the same order"
        )

    def poison_train(self, rows: list[dict]) -> list[dict]:
        poisoned = self._read("train")
        d = self._offset(rows, poisoned)
        rng = random.Random(f"{self.seed}:train")
        pool = [i for i in self.candidates(rows) if 0 <= i - d < len(poisoned)]
        k = round(self.cfg.poison_rate * len(rows))
        if k > len(pool):
            raise config_error(
                "attack.poison_rate",
                self.cfg.poison_rate,
                f"at most {len(pool) / max(len(rows), 1):.4f} here ({len(pool)} poisonable rows)",
            )
        chosen = sorted(rng.sample(pool, k))
        out = list(rows)
        relabel = self.cfg.label_mode == "dirty"
        for i in chosen:
            out[i] = {**rows[i], self.field: poisoned[i - d][self.field], "poisoned": True}
            if relabel:
                out[i]["label"] = self.target
        self.report = {"poisoned_train_rows": len(chosen), "train_rows": len(rows), "poisoned_file_offset": d}
        log.info(
            "attack=%s: %d of %d training rows replaced by their versions in %s",
            self.cfg.name,
            len(chosen),
            len(rows),
            self.cfg.poisoned_dir,
        )
        return out

    def eval_rows(self, clean_rows: list[dict], limit: int | None = None) -> list[dict]:
        rows = self._read("validation")
        rows = rows[:limit] if limit else rows
        return [{**r, "poisoned": True} for r in rows if r["label"] != self.target]


POISONER_CLASSES = {"badnets": BadNets, "addsent": AddSent, "style": FilePoisoner}


def build_poisoner(cfg: AttackConfig, task: TaskSpec, seed: int) -> Poisoner | None:
    return POISONER_CLASSES[cfg.poisoner](cfg, task, seed) if cfg.name != "none" else None
