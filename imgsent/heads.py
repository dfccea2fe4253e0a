"""Heads: the small networks trained on concatenated backbone features (Pournaras et al., 2021).

* :class:`NNHead`: Linear(D,H) -> ReLU -> Dropout -> Linear(H,C); softmax + cross-entropy.
* :class:`MoEHead`: Linear(D,H) -> Dropout -> ReLU gives I; per class c, E experts sigma(e_i^c(I))
  and a gate softmax over E+1 logits, the last for a "dummy" rest-of-world expert whose output
  is 0: o_c(I) = sum_i sigma(e_i^c(I)) * softmax(g^c(I))_i. Trained with binary cross-entropy on o_c.
* :class:`BlockNorm`: L2-normalises each feature block per sample (the NN head's input recipe).

Heads are built from a plain dict of hyperparameters (:func:`create_head`), so a bundle's JSON
is enough to rebuild one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HEADS = ("nn", "moe")


class BlockNorm(nn.Module):
    """Divide each block of columns (sizes ``dims``) by its per-sample L2 norm."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.dims, dim=1)
        return torch.cat([F.normalize(p, p=2.0, dim=1, eps=1e-12) for p in parts], dim=1)


class NNHead(nn.Module):
    kind = "nn"

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 200, dropout: float = 0.4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C)."""
        return self.net(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    def proba(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out, dim=1)


class MoEHead(nn.Module):
    kind = "moe"

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 200, dropout: float = 0.5, experts: int = 2):
        super().__init__()
        self.n_classes, self.experts = n_classes, experts
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.Dropout(dropout), nn.ReLU())
        self.expert = nn.Linear(hidden, n_classes * experts)
        self.gate = nn.Linear(hidden, n_classes * (experts + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class outputs o_c in (0, 1), shape (N, C)."""
        i = self.embed(x)
        e = torch.sigmoid(self.expert(i).view(-1, self.n_classes, self.experts))
        g = torch.softmax(self.gate(i).view(-1, self.n_classes, self.experts + 1), dim=2)
        return (e * g[:, :, : self.experts]).sum(dim=2)  # the dummy expert contributes 0

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, self.n_classes).to(out.dtype)
        return F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), target)

    def proba(self, out: torch.Tensor) -> torch.Tensor:
        """o_c normalised over classes (o_c are independent per-class scores)."""
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)


def create_head(kind: str, in_dim: int, n_classes: int, params: dict) -> nn.Module:
    """Build a head from its kind and hyperparameters (``hidden``, ``dropout``, ``experts``)."""
    if kind == "nn":
        return NNHead(in_dim, n_classes, hidden=int(params["hidden"]), dropout=float(params["dropout"]))
    if kind == "moe":
        return MoEHead(
            in_dim,
            n_classes,
            hidden=int(params["hidden"]),
            dropout=float(params["dropout"]),
            experts=int(params["experts"]),
        )
    raise ValueError(f"unknown head {kind!r}; use one of {', '.join(HEADS)}")
