"""How an attack and a defense enter one run: :class:`BackdoorSuite` is the one object ``lightmods.run`` asks.

Threat models:

- data poisoning (``badnets``, ``addsent``, ``style``): the user fine-tunes on a training set an attacker
  poisoned; the defense (if any) trains with the user in that fit;
- two stages (``attack.clean_tune_steps > 0``, the default of ``gradient_control``): the fit is the attacker's
  backdoor injection (with the gradient-control rule for ``gradient_control``); then the user fine-tunes the
  same trainable parameters on the clean training rows for ``clean_tune_steps`` optimizer steps (a fresh
  optimizer and schedule, ``attack.clean_tune_lr`` or ``method.lr``), and the defense trains in that stage.
  CACC and ASR are measured after both (``*_after_injection``, ``*_after_clean_tuning``).

Evaluation (when :func:`backdoor_enabled`): ``val/cacc`` (accuracy on the clean dev split) always, and under an
attack ``val/asr`` on the poisoned dev split (non-target rows with the trigger).
"""

from __future__ import annotations

import dataclasses
import logging

from lightmods.attacks.config import AttackConfig, DefenseConfig, backdoor_enabled
from lightmods.attacks.metrics import attack_success_rate, clean_accuracy
from lightmods.attacks.poison import POISONED_SPLIT, POISONED_SUFFIX, build_poisoner
from lightmods.data.tasks import TaskSpec

log = logging.getLogger("lightmods")


class BackdoorSuite:
    def __init__(self, attack: AttackConfig, defense: DefenseConfig, task: TaskSpec, seed: int = 0):
        self.attack, self.defense, self.task = attack, defense, task
        self.enabled = backdoor_enabled(attack, defense, task)
        self.poisoner = build_poisoner(attack, task, seed) if self.enabled else None
        self.clean_split = next(iter(task.eval_splits))
        self.report: dict = {}
        self.isolation = None  # the defense's row isolation, when it has one

    @property
    def two_stage(self) -> bool:
        return self.poisoner is not None and self.attack.clean_tune_steps > 0

    # ------------------------------------------------------------ evaluation
    @property
    def eval_splits(self) -> dict[str, str]:
        """Splits the attack adds to the task's evaluation splits (name -> metric suffix)."""
        return {POISONED_SPLIT: POISONED_SUFFIX} if self.poisoner is not None else {}

    def metrics(self, split: str, prefix: str = "val/", suffix: str = "", sync: bool = True) -> list:
        """Extra metric objects for ``split`` (see :func:`lightmods.data.metrics.split_metrics`)."""
        if not self.enabled:
            return []
        if split == self.clean_split:
            return [clean_accuracy(self.task.num_labels, prefix, sync)]
        if split == POISONED_SPLIT and self.poisoner is not None:
            return [attack_success_rate(self.poisoner.target, prefix, suffix, sync)]
        return []

    # ------------------------------------------------------------ training
    def defense_terms(self) -> list:
        d = self.defense
        if d.name == "max_entropy":
            from lightmods.losses.max_entropy import max_entropy_term

            return [
                max_entropy_term(d.weight, d.form, d.temperature, d.start_step, d.warmup_steps, d.end_step, d.select, d.select_ratio)
            ]
        return []

    def train_flagger(self, tokenizer):
        """The defense's isolation of suspect training rows (``select=lexical``), or None."""
        d = self.defense
        if d.name != "max_entropy" or d.select != "lexical":
            return None
        from lightmods.attacks.isolation import LexicalIsolation

        self.isolation = LexicalIsolation(
            d.lexical_min_share, d.lexical_min_purity, set(tokenizer.all_special_ids), tokenizer.convert_ids_to_tokens,
            scrub=d.lexical_scrub, phrase_agree=d.lexical_phrase_agree,
        )
        return self.isolation

    def loss_terms(self) -> list:
        """Terms for the main fit: the defense's, unless the fit is the attacker's injection."""
        return [] if self.two_stage else self.defense_terms()

    def training_rule(self):
        if self.poisoner is not None and self.attack.name == "gradient_control":
            from lightmods.attacks.gradient_control import GradientControl

            return GradientControl(self.attack.gradient_control)
        return None

    def summary(self) -> dict:
        if not self.enabled:
            return {}
        out = {"attack": self.attack.name, "defense": self.defense.name}
        if self.poisoner is not None:
            out.update(self.poisoner.report)
            out["target_label"] = self.task.label_names[self.poisoner.target]
        if self.defense.name == "max_entropy":  # defense=max_entropy and max_entropy_isolated differ here
            out["defense_select"] = self.defense.select
            out["defense_scrub"] = self.defense.lexical_scrub
        if self.isolation is not None:  # the last flagging (the clean stage's, when there is one)
            out.update({f"defense_{k}": v for k, v in self.isolation.report.items()})
        return {**out, **self.report}

    # ------------------------------------------------------------ the user's clean fine-tuning stage
    def clean_tune(self, module, dm, rc, files) -> dict:
        """Measure CACC/ASR after injection (rank 0), then fine-tune on the clean training rows. Returns the
        after-injection figures for ``metrics.json``."""
        import lightning as L
        from lightning.pytorch.callbacks import TQDMProgressBar

        from lightmods.evaluate import evaluate

        injected: dict[str, float] = {}
        trainer_rank = module.trainer.global_rank if module._trainer is not None else 0
        if trainer_rank == 0:
            dm.setup("validate")
            for split, suffix in ((self.clean_split, ""), (POISONED_SPLIT, POISONED_SUFFIX)):
                values, _ = evaluate(module, dm, split, suffix=suffix, extra=self.metrics, task_metrics=False)
                injected.update(values)
            log.info("after injection: %s", injected)
        steps = self.attack.clean_tune_steps
        module.training_rule = None
        module.loss_terms = [*module.loss_terms, *self.defense_terms()]  # the method's, then the defense's
        if self.attack.clean_tune_lr is not None:
            module.lr = self.attack.clean_tune_lr
        dm.use_clean_train()
        kwargs = {**dataclasses.asdict(rc.trainer), "max_steps": steps, "max_epochs": -1, "min_epochs": None,
                  "limit_val_batches": 0, "num_sanity_val_steps": 0, "val_check_interval": None}  # fmt: skip
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        callbacks = (
            [TQDMProgressBar(refresh_rate=rc.callbacks.progress_bar_refresh_rate)]
            if rc.callbacks.progress_bar
            else []
        )
        stage = L.Trainer(**kwargs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                          enable_progress_bar=rc.callbacks.progress_bar, default_root_dir=str(files.dir))  # fmt: skip
        log.info(
            "clean fine-tuning: %d steps on %d clean training rows (lr %g)",
            steps,
            len(dm.raw["train"]),
            module.lr,
        )
        stage.fit(module, datamodule=dm)
        self.report = {
            "clean_tune_steps": stage.global_step,
            "cacc_after_injection": injected.get("val/cacc"),
            "asr_after_injection": injected.get("val/asr"),
        }
        return {f"{k}_after_injection": v for k, v in injected.items()}

    def after_evaluation(self, metrics: dict) -> None:
        """Figures of the final evaluation for ``summary.json`` (after clean tuning when there is a stage)."""
        if self.two_stage:
            self.report["cacc_after_clean_tuning"] = metrics.get("val/cacc")
            self.report["asr_after_clean_tuning"] = metrics.get("val/asr")
