"""Schemas of the ``attack`` and ``defense`` groups, and the checks that need the task (target label, text field).

Defaults live here; ``conf/attack/<name>.yaml`` and ``conf/defense/<name>.yaml`` only state what differs.
Where the papers are silent (see ``../shared/research/exits_losses_lora.md``, sections 2 and 3), the choice
is a key with the default documented next to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightmods.config import checks
from lightmods.errors import config_error

ATTACKS = ("none", "badnets", "addsent", "style", "gradient_control")
POISONERS = ("badnets", "addsent", "style")  # how poisoned rows are made (gradient_control uses one of them)
LABEL_MODES = ("dirty", "clean")
POSITIONS = ("random", "start", "end")
DEFENSES = ("none", "max_entropy")
ME_FORMS = ("entropy", "uniform_ce")
ME_SELECTIONS = ("all", "low_loss", "lexical")
BADNETS_TRIGGERS = [
    "cf",
    "mn",
    "bb",
    "tq",
    "mb",
]  # the rare words of BadNets for text (Kurita et al.; OpenBackdoor)
ADDSENT_SENTENCE = "I watch this 3D movie"  # OpenBackdoor's AddSent default


@dataclass
class GradientControlConfig:
    """The two strategies of the gradient-control attack (Gu et al., ACL 2023), applied per training step to
    the gradients of the clean task (clean rows of the batch) and of the poisoned task (poisoned rows).

    ``magnitude``: cross-layer control of the poisoned task's gradient: every transformer layer's gradient
    (all trainable parameters of the layer as one vector) is rescaled to the same norm, the ``magnitude_target``
    (mean or max) of the layers' norms. Parameters outside the layers (classifier head, embeddings) keep theirs.
    ``projection``: per layer (and for the parameters outside the layers, as one group), when the two tasks'
    gradients conflict (negative dot product) the poisoned one loses its component along the clean one
    (``projection_target=poisoned``), or both lose their components along each other (``both``, PCGrad).
    The update is ``g_clean + g_poisoned`` after both strategies; ``poison_weight`` scales the poisoned loss.
    """

    magnitude: bool = True
    magnitude_target: str = "mean"
    projection: bool = True
    projection_target: str = "poisoned"
    poison_weight: float = 1.0
    layer_pattern: str = r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\."
    eps: float = 1e-12

    def __post_init__(self):
        checks.one_of("attack.gradient_control.magnitude_target", self.magnitude_target, ("mean", "max"))
        checks.one_of(
            "attack.gradient_control.projection_target", self.projection_target, ("poisoned", "both")
        )
        checks.positive("attack.gradient_control.poison_weight", self.poison_weight)
        checks.positive("attack.gradient_control.eps", self.eps)
        try:
            pattern = re.compile(self.layer_pattern)
        except re.error as e:
            raise config_error(
                "attack.gradient_control.layer_pattern", self.layer_pattern, f"a regular expression ({e})"
            ) from None
        if pattern.groups < 1:
            raise config_error(
                "attack.gradient_control.layer_pattern",
                self.layer_pattern,
                "a regular expression with one group capturing the layer index",
            )


@dataclass
class AttackConfig:
    """A backdoor attack on a classification task.

    ``badnets``: ``num_triggers`` words drawn from ``triggers`` inserted at ``position`` (random word
    positions by default). ``addsent``: the ``sentence`` inserted at ``position``. ``style``: pre-poisoned
    files (StyleAttack format: ``text \\t label``, original labels) from ``poisoned_dir``, row-aligned with the
    clean training file. ``gradient_control``: a ``poisoner`` (one of the three) makes the poisoned task and
    the gradient-control rule trains clean and poisoned rows as two tasks.

    ``poison_rate`` of the training rows (``round(rate * n)`` rows) are poisoned in place: ``dirty`` label
    mode picks non-target rows and relabels them to ``target_label``; ``clean`` label mode picks target rows
    and keeps their label. ``seed: null`` uses the run's seed. ``clean_tune_steps > 0`` adds the user's clean
    fine-tuning stage after the (attacker's) training, and ASR is measured after both.
    """

    name: str = "none"
    poisoner: str | None = None
    poison_rate: float = 0.1
    target_label: Any = 1
    label_mode: str = "dirty"
    seed: int | None = None
    text_field: str | None = None
    triggers: list[str] = field(default_factory=lambda: list(BADNETS_TRIGGERS))
    num_triggers: int = 1
    sentence: str = ADDSENT_SENTENCE
    position: str = "random"
    poisoned_dir: str | None = None
    clean_tune_steps: int = 0
    clean_tune_lr: float | None = None
    gradient_control: GradientControlConfig = field(default_factory=GradientControlConfig)

    def __post_init__(self):
        checks.one_of("attack.name", self.name, ATTACKS)
        if self.name == "gradient_control":
            self.poisoner = self.poisoner or "badnets"
            checks.one_of("attack.poisoner", self.poisoner, POISONERS)
        else:
            own = self.name if self.name in POISONERS else None
            if self.poisoner not in (None, own):
                raise config_error(
                    "attack.poisoner",
                    self.poisoner,
                    f"null for attack.name={self.name!r} (only gradient_control takes a poisoner)",
                )
            self.poisoner = own
        checks.ratio("attack.poison_rate", self.poison_rate, closed_right=True)
        if isinstance(self.target_label, bool) or not isinstance(self.target_label, (int, str)):
            raise config_error(
                "attack.target_label", self.target_label, "a class index or a label name of the task"
            )
        checks.one_of("attack.label_mode", self.label_mode, LABEL_MODES)
        checks.one_of("attack.position", self.position, POSITIONS)
        checks.positive("attack.num_triggers", self.num_triggers)
        if self.poisoner == "badnets" and (
            not self.triggers or any(not str(t).strip() or " " in str(t).strip() for t in self.triggers)
        ):
            raise config_error("attack.triggers", list(self.triggers), "a non-empty list of single words")
        if self.poisoner == "addsent" and not self.sentence.strip():
            raise config_error("attack.sentence", self.sentence, "a non-empty trigger sentence")
        if self.poisoner == "style":
            if not self.poisoned_dir:
                raise config_error(
                    "attack.poisoned_dir",
                    self.poisoned_dir,
                    "a folder with the pre-poisoned train.tsv and dev.tsv (e.g. ../shared/data/backdoor/bible/sst-2)",
                )
            if not Path(self.poisoned_dir).is_dir():
                raise config_error(
                    "attack.poisoned_dir",
                    self.poisoned_dir,
                    "an existing folder with the pre-poisoned train.tsv and dev.tsv",
                )
        checks.non_negative("attack.clean_tune_steps", self.clean_tune_steps)
        if self.clean_tune_steps and self.name == "none":
            raise config_error(
                "attack.clean_tune_steps",
                self.clean_tune_steps,
                "0 when attack.name='none' (there is no backdoor to forget)",
            )
        checks.positive("attack.clean_tune_lr", self.clean_tune_lr, allow_none=True)


@dataclass
class DefenseConfig:
    """A defense applied to the user's fine-tuning.

    ``max_entropy`` (Liu et al., Findings ACL 2023) adds ``lambda(step) * L_ME`` to the cross-entropy on every
    training row (the defender cannot tell poisoned rows from clean ones). ``form=entropy``: ``L_ME = -H(p)``,
    the negative entropy of ``p = softmax(logits / temperature)``; ``form=uniform_ce``: the cross-entropy of the
    uniform distribution against ``p``, ``-(1/C) sum_c log p_c``. Schedule: ``lambda(step) = weight`` from
    ``start_step`` on (0 before), ramped linearly over the first ``warmup_steps`` after it, and 0 again from
    ``end_step`` (null: to the end). Steps are optimizer steps of the stage the defense trains in.
    ``select=all`` (default) adds the term on every row; ``select=low_loss`` trains the ``select_ratio`` share of
    each batch's rows with the lowest cross-entropy on ``weight * L_ME`` instead of cross-entropy
    (``lightmods/losses/max_entropy.py`` says why); ``select=lexical`` does so for the training rows that hold a
    token found in at least ``lexical_min_share`` of the training rows, at least ``lexical_min_purity`` of them with
    one label (``lightmods/attacks/isolation.py``), flagged once before training; ``lexical_scrub`` also deletes
    those tokens from the flagged rows, with their phrases: the neighbours found beside at least
    ``lexical_phrase_agree`` of a token's occurrences (null: the tokens alone).
    """

    name: str = "none"
    weight: float = 1.0
    form: str = "entropy"
    temperature: float = 1.0
    start_step: int = 0
    warmup_steps: int = 0
    end_step: int | None = None
    select: str = "all"
    select_ratio: float = 0.1
    lexical_min_share: float = 0.01
    lexical_min_purity: float = 0.99
    lexical_scrub: bool = False
    lexical_phrase_agree: float | None = 0.9

    def __post_init__(self):
        checks.one_of("defense.name", self.name, DEFENSES)
        checks.one_of("defense.select", self.select, ME_SELECTIONS)
        if self.select_ratio is None or not 0 < self.select_ratio <= 1:
            raise config_error("defense.select_ratio", self.select_ratio, "a number in (0, 1] (the share of each batch's rows)")
        for key, what in (
            ("lexical_min_share", "the share of the training rows a suspect token occurs in"),
            ("lexical_min_purity", "the share of a suspect token's rows that carry one label"),
        ):
            value = getattr(self, key)
            if value is None or not 0 < value <= 1:
                raise config_error(f"defense.{key}", value, f"a number in (0, 1] ({what})")
        agree = self.lexical_phrase_agree
        if agree is not None and (isinstance(agree, bool) or not isinstance(agree, int | float) or not 0.5 < agree <= 1):
            raise config_error(
                "defense.lexical_phrase_agree", agree,
                "null (scrub the suspect tokens alone) or a number in (0.5, 1] (the share of a suspect token's occurrences a neighbour must accompany to join its phrase)",
            )  # fmt: skip
        if self.lexical_scrub and self.select != "lexical":
            raise config_error("defense.lexical_scrub", self.lexical_scrub, f"false unless defense.select=lexical (it is {self.select!r})")
        checks.non_negative("defense.weight", self.weight)
        checks.one_of("defense.form", self.form, ME_FORMS)
        checks.positive("defense.temperature", self.temperature)
        checks.non_negative("defense.start_step", self.start_step)
        checks.non_negative("defense.warmup_steps", self.warmup_steps)
        if self.end_step is not None and self.end_step <= self.start_step:
            raise config_error(
                "defense.end_step", self.end_step, f"null or a step > defense.start_step ({self.start_step})"
            )


def resolve_target(value, task) -> int:
    """The target class index of ``attack.target_label`` (an index or a label name) for ``task``."""
    names = task.label_names or ()
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        i = int(value)
    except (TypeError, ValueError):
        i = None
    if i is not None and str(i) == str(value).strip() and 0 <= i < len(names):
        return i
    raise config_error(
        "attack.target_label",
        value,
        f"a class of {task.name}: one of {', '.join(names)} or 0..{len(names) - 1}",
    )


def backdoor_enabled(attack: AttackConfig, defense: DefenseConfig, task) -> bool:
    """Backdoor evaluation (``val/cacc``, and ``val/asr`` under an attack) is on for an attack, a defense,
    or a ``backdoor/*`` task; other runs keep their metrics unchanged."""
    return attack.name != "none" or defense.name != "none" or task.benchmark == "backdoor"


def check_backdoor(
    attack: AttackConfig, defense: DefenseConfig, task_name: str, precision: Any = None
) -> None:
    """Checks across groups, run by ``RunConfig`` before anything trains."""
    from lightmods.data.tasks import TASKS

    task = TASKS[task_name]
    if not backdoor_enabled(attack, defense, task):
        return
    if attack.name == "none" and defense.name == "none":
        return  # a backdoor/* task trained as is
    single_label = task.head == "seq_cls" and task.builder == "text" and not task.is_regression
    if not single_label:
        key, value = ("attack.name", attack.name) if attack.name != "none" else ("defense.name", defense.name)
        raise config_error(
            key,
            value,
            f"'none' for data.task={task_name!r} (attacks and defenses need a single-label text classification task)",
        )
    if attack.name == "none":
        return
    resolve_target(attack.target_label, task)
    if attack.text_field is not None:
        checks.one_of("attack.text_field", attack.text_field, task.text_fields)
    if attack.poisoner == "style" and len(task.text_fields) != 1:
        raise config_error(
            "attack.poisoner",
            "style",
            f"badnets or addsent for data.task={task_name!r} (pre-poisoned files hold one text per row)",
        )
    if attack.name == "gradient_control" and str(precision) in ("16", "16-mixed", "16-true"):
        raise config_error(
            "trainer.precision",
            precision,
            "32-true or bf16-mixed with attack=gradient_control (it takes per-task gradients of unscaled losses)",
        )
