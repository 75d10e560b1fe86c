"""``method=quant``'s training-time state: the frozen full-precision teacher follows the student to its device,
and the contrastive memory bank travels in checkpoints (so a resumed run sees the same negatives)."""

from __future__ import annotations

import lightning as L


class QuantTraining(L.Callback):
    def __init__(self, method):
        self.method = method

    @property
    def state_key(self) -> str:
        return "QuantTraining"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.method.teacher is not None:
            self.method.teacher.to(pl_module.device)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.method.teacher is not None:
            self.method.teacher.to(pl_module.device).eval()
        if self.method.bank is not None:
            self.method.bank.to(pl_module.device)

    def state_dict(self) -> dict:
        return {"bank": self.method.bank.state_dict() if self.method.bank is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("bank") is not None and self.method.bank is not None:
            self.method.bank.load_state_dict(state["bank"])
