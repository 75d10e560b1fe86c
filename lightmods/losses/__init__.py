"""Named loss terms a method or a defense adds to the task loss; each is logged on its own
(``train/loss_<name>``). Each module is usable alone: a function on logits plus a ``LossTerm`` factory."""

from lightmods.losses.max_entropy import entropy, max_entropy_loss, max_entropy_term, schedule_factor

__all__ = ["entropy", "max_entropy_loss", "max_entropy_term", "schedule_factor"]
