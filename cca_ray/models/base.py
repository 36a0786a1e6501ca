"""The one protocol everything above the models speaks. Only adapters know a family's token layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@dataclass
class Cond:
    """A batch of encoded conditions for one image grid.

    input_ids, attention_mask: LongTensor[B, L], left padded, so that every row's
    prefix ends at the same column and image tokens line up across the batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    grid: tuple[int, int]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Cond":
        return Cond(self.input_ids.to(device), self.attention_mask.to(device), self.grid)


@runtime_checkable
class ARVisualModel(Protocol):
    codebook_size: int
    max_prompt_tokens: int
    module: nn.Module  # scores sequences; this is what DeepSpeed wraps

    def encode_conditions(self, raw: Sequence[str], grid: tuple[int, int]) -> Cond: ...

    def null_condition(self, n: int, grid: tuple[int, int]) -> Cond: ...

    def sequence_logprob(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """log p(codes | cond), summed over image tokens: Tensor[B] (nats)."""
        ...

    def generate(
        self,
        cond: Cond,
        *,
        guidance: float = 0.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Sample code grids LongTensor[B, h, w]; guidance=0 runs one forward per token."""
        ...

    def save(self, path) -> None: ...
