"""Token-level contrastive distillation (Tao et al., ACL 2022): each token's student representation is pulled
towards the teacher's representation of the same token and pushed from the teacher's representations of other
tokens (InfoNCE with cosine similarity and a temperature). Negatives are the other tokens of the batch and,
optionally, teacher representations of earlier batches kept in a first-in first-out memory bank. Occurrences
of the same token id are neither positives nor negatives of each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    bank_keys: torch.Tensor | None = None,
    bank_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_i -log exp(s(q_i, k_i)/T) / (exp(s(q_i, k_i)/T) + sum_{j: id_j != id_i} exp(s(q_i, k_j)/T))``.

    ``student``, ``teacher``: ``(N, d)``, row ``i`` of both the same token occurrence; ``ids``: ``(N,)`` token
    ids; ``bank_keys``/``bank_ids``: ``(M, d)``/``(M,)`` extra teacher keys (negatives unless they share the
    query's id). ``s`` is the cosine similarity. The teacher side carries no gradient."""
    q = F.normalize(student.float(), dim=-1)
    k = F.normalize(teacher.detach().float(), dim=-1)
    logits = q @ k.T / temperature
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)  # the positive stays
    logits = logits.masked_fill(same, float("-inf"))
    if bank_keys is not None and bank_keys.numel():
        bank = q @ F.normalize(bank_keys.detach().float(), dim=-1).T / temperature
        bank = bank.masked_fill(ids[:, None] == bank_ids[None, :], float("-inf"))
        logits = torch.cat([logits, bank], dim=1)
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


class TokenMemoryBank:
    """A first-in first-out queue of ``size`` teacher token representations and their token ids."""

    def __init__(self, size: int):
        self.size = size
        self.keys: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self.ptr = 0
        self.filled = 0

    def to(self, device) -> TokenMemoryBank:
        if self.keys is not None:
            self.keys, self.ids = self.keys.to(device), self.ids.to(device)
        return self

    def contents(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.keys is None or not self.filled:
            return None, None
        return self.keys[: self.filled], self.ids[: self.filled]

    @torch.no_grad()
    def push(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        self.to(keys.device)
        keys = F.normalize(keys.detach().float(), dim=-1)[-self.size :]
        ids = ids[-self.size :]
        if self.keys is None:
            self.keys = keys.new_zeros(self.size, keys.shape[1])
            self.ids = ids.new_full((self.size,), -1)
        n = keys.shape[0]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.keys[idx] = keys
        self.ids[idx] = ids
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def state_dict(self) -> dict:
        keys, ids = self.contents()
        return {"keys": None if keys is None else self.keys.cpu(), "ids": None if ids is None else self.ids.cpu(), "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.ids = state["keys"], state["ids"]
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
