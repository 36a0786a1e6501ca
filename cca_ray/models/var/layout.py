"""VAR's multi-scale token layout: square token maps from coarse to fine, concatenated.

Scale k is a ``patch_nums[k] x patch_nums[k]`` map of codes in row-major order. One image is
the flat sequence ``[scale 0 | scale 1 | ... | scale K-1]``: 1+4+9+16+25+36+64+100+169+256 =
680 codes for VAR's ten scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16). The model predicts a whole
scale from one forward, so attention is *block-causal*: a token sees every token of its own
scale and of all coarser ones, never a finer one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class ScaleLayout:
    patch_nums: tuple[int, ...] = PATCH_NUMS

    def __post_init__(self):
        pn = tuple(int(p) for p in self.patch_nums)
        if len(pn) < 2 or any(p <= 0 for p in pn) or list(pn) != sorted(pn):
            raise ValueError(f"patch_nums must be at least two increasing positive sizes, got {self.patch_nums}")
        object.__setattr__(self, "patch_nums", pn)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens per scale: patch_num**2."""
        return tuple(p * p for p in self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def first_l(self) -> int:
        """Tokens of the first scale: they come from the class embedding, not from codes."""
        return self.lengths[0]

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale in the flat sequence."""
        out, cur = [], 0
        for n in self.lengths:
            out.append((cur, cur + n))
            cur += n
        return out

    @property
    def grid(self) -> tuple[int, int]:
        """The last (finest) scale's map, which the VQVAE decodes."""
        return (self.patch_nums[-1], self.patch_nums[-1])

    def level_ids(self) -> torch.Tensor:
        """LongTensor[L]: the scale index of every token."""
        return torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(self.lengths)])

    def attn_bias(self) -> torch.Tensor:
        """Additive block-causal mask FloatTensor[1, 1, L, L]: 0 where query level >= key level, else -inf."""
        lvl = self.level_ids()
        allowed = lvl[:, None] >= lvl[None, :]
        return torch.where(allowed, 0.0, float("-inf")).view(1, 1, self.num_tokens, self.num_tokens)

    def split(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Flat codes [B, L] -> one [B, pn*pn] index map per scale (views)."""
        if codes.shape[-1] != self.num_tokens:
            raise ValueError(f"codes have {codes.shape[-1]} tokens per image; the scales {self.patch_nums} "
                             f"need {self.num_tokens}")
        return list(torch.split(codes, self.lengths, dim=-1))

    def join(self, per_scale: list[torch.Tensor]) -> torch.Tensor:
        """One [B, pn*pn] (or [B, pn, pn]) map per scale -> flat codes [B, L]."""
        if len(per_scale) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} index maps, got {len(per_scale)}")
        return torch.cat([m.reshape(m.shape[0], -1) for m in per_scale], dim=1)
