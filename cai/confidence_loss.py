"""Per-pair confidence in DPO. TRL's sigmoid loss takes one global `label_smoothing` at most (TRL
issue #5613 asks for more); cai's labels carry the judge's probability p that the chosen answer
is the better one, and these modes let each pair's p shape its own term:

- `cdpo`: conservative DPO with eps = 1 - p per pair:
  -(1 - eps) * logsig(beta * m) - eps * logsig(-beta * m), where m is the pair's log-ratio margin.
  Since logsig(x) - logsig(-x) = x, that is TRL's term -logsig(beta * m) plus eps * beta * m.
- `weight`: TRL's term scaled by w = 2p - 1, how far the judge is from a coin toss (p = 1: full
  weight; p = 0.5: none).

Both are written as TRL's per-pair loss plus a correction, so TRL computes the loss, its metrics
and its forward as it always does, and cai adds the mean correction. Before adding it, cai checks
that TRL's loss is the plain sigmoid mean of the same margins it computed; a TRL release that
changes that is refused loudly rather than trained on silently (cai.train.CaiDPOTrainer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

ConfidenceMode = Literal["off", "cdpo", "weight"]
CONFIDENCE_MODES: tuple[str, ...] = ("off", "cdpo", "weight")


def clamp_confidence(confidence: torch.Tensor) -> torch.Tensor:
    """p in [0.5, 1]: a label is the judge's winner, so below a coin toss it carries no preference
    (and a missing confidence, stored as NaN by the collator, counts as a hard label, p = 1)."""
    import torch

    return torch.nan_to_num(confidence, nan=1.0).clamp(0.5, 1.0)


def correction(
    margins: torch.Tensor, confidence: torch.Tensor, mode: ConfidenceMode, beta: float
) -> torch.Tensor:
    """Per pair, what to add to TRL's sigmoid term -logsig(beta * margin) to get `mode`'s term."""
    import torch.nn.functional as F

    p = clamp_confidence(confidence).to(margins.dtype)
    if mode == "cdpo":
        return (1.0 - p) * beta * margins
    if mode == "weight":
        return -(2.0 * p - 2.0) * F.logsigmoid(beta * margins)  # (w - 1) * -logsig, w = 2p - 1
    return margins.new_zeros(margins.shape)


def sigmoid_loss(margins: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's sigmoid DPO loss over a batch: the mean of -logsig(beta * margin)."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * margins).mean()
