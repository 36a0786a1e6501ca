"""Batched KV-cache decoding of code grids, guidance-free or with classifier-free guidance.

The sampler knows nothing about a model family. An adapter hands it

* a *backend* with ``prefill(input_ids, attention_mask, need_logits)`` and
  ``step(token_ids, need_logits)`` returning visual-slice logits ``[rows, K]`` (or None), and
* a *schedule*: one entry per decode step, ``-1`` where one visual code is sampled, a token id
  where the layout forces a token (Emu3's end-of-line after every row), or ``SampleBlock(n)``
  where n codes are sampled at once from one forward (a whole scale of VAR). For a block the
  backend returns logits ``[rows, n, K]`` and is fed the n codes ``[rows, n]``.

Every row of a batch shares the layout, so the constraint is one decision per step for the
whole batch, never a per-sample Python loop.

Guidance convention (as in the CCA paper): ``l = l_c + s * (l_c - l_u)`` on log-probabilities,
so ``guidance_scale = 0`` is plain conditional sampling. ``guidance_scale`` is one number or
one per sampling step (VAR ramps it over the scales). When every step's scale is 0 the
unconditional rows are not built at all: one forward of B rows per step. Otherwise conditional
and unconditional rows go through one batched forward of 2B rows that share a KV-cache layout
(at every step, so that the unconditional cache is complete where guidance starts).

Per-row seeds: each row draws its uniforms (one per code, blocks included) from its own
generator and samples by inverse CDF, so a row's tokens depend on its seed and its
distribution only, not on which other requests shared the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SampleBlock:
    """Schedule entry: sample ``n`` codes from one forward (logits [rows, n, K])."""

    n: int

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SampleBlock needs n >= 1, got {self.n}")


def codes_at(entry: "int | SampleBlock") -> int:
    """How many codes a schedule entry samples (0 for a forced token)."""
    if isinstance(entry, SampleBlock):
        return entry.n
    return 1 if entry < 0 else 0


class DecodeBackend(Protocol):
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, need_logits: bool) -> torch.Tensor | None: ...

    def step(self, token_ids: torch.Tensor, need_logits: bool) -> torch.Tensor | None: ...


@dataclass
class SampleOutput:
    codes: torch.Tensor  # LongTensor[B, n_visual] in [0, K)
    seeds: list[int]
    step_logprobs: torch.Tensor | None = None  # [B, n_visual] log-prob of each drawn code under the sampling distribution
    step_dists: torch.Tensor | None = None  # [B, n_visual, K] the full sampling distributions (log-probs), tests only


def make_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """One seed per row: an int seeds row i with seed+i; a list is taken as is; None draws fresh ones."""
    if seed is None:
        return [int(s) for s in torch.randint(0, 2**62, (n,))]
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed: got {len(seeds)} seeds for {n} rows")
    return seeds


def row_uniforms(seeds: Sequence[int], n: int, device=None) -> torch.Tensor:
    """u[b, j] in (0, 1] drawn from row b's own generator: Tensor[B, n]."""
    out = torch.empty(len(seeds), n, dtype=torch.float64)
    for b, s in enumerate(seeds):  # once per request, not per step
        g = torch.Generator().manual_seed(s)
        out[b] = 1.0 - torch.rand(n, generator=g, dtype=torch.float64)
    return out.to(device) if device is not None else out


def filter_logprobs(logp: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k / the top-p nucleus; keeps at least one token per row."""
    if top_k is not None and top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_lp, idx = torch.sort(logp, dim=-1, descending=True)
        probs = sorted_lp.softmax(-1)
        # drop a token when the mass before it already exceeds top_p
        drop_sorted = (probs.cumsum(-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def sampling_logprobs(
    logits: torch.Tensor,
    n_cond: int,
    guidance_scale: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> torch.Tensor:
    """Visual-slice logits of the forward's rows [rows, (n,) K] -> the sampling distribution
    (log-probs) [B, (n,) K]. Rows [0, n_cond) are conditional; rows [n_cond, 2 n_cond)
    unconditional when guidance is on. Plain sampling (no guidance, temperature 1, no filter) is one
    log-softmax: at small batches a step's sampling ops cost as much as a small model's forward."""
    lp = F.log_softmax(logits[:n_cond].float(), dim=-1)
    plain = guidance_scale == 0.0 and temperature == 1.0 and top_k is None and (top_p is None or top_p >= 1.0)
    if plain:
        return lp
    if guidance_scale != 0.0:
        lp_u = F.log_softmax(logits[n_cond : 2 * n_cond].float(), dim=-1)
        lp = torch.add(lp, lp - lp_u, alpha=guidance_scale)
    if temperature != 1.0:
        lp = lp / temperature
    return F.log_softmax(filter_logprobs(lp, top_k, top_p), dim=-1)


CDF_BLOCK = 64  # inverse_cdf's block width: one float64 cumsum over K / 64 block sums and one over 64 entries


def inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of exp(logp) [..., K] with uniforms u [...] in (0, 1].

    The index is the first k whose cumulative probability reaches u * total, found in two levels:
    the block (of CDF_BLOCK entries) from a float64 cumsum of block sums, then the entry from a float64
    cumsum inside that block. Same draws as one float64 cumsum over K, which is sequential and made the
    sampler's step 2-10x slower than this (K = 4,096 to 32,768)."""
    shape, k = u.shape, logp.shape[-1]
    p = logp.reshape(-1, k).exp()
    pad = -k % CDF_BLOCK
    if pad:
        p = F.pad(p, (0, pad))  # zero mass: never drawn
    rows = p.shape[0]
    p = p.view(rows, -1, CDF_BLOCK)
    block_cdf = p.sum(-1, dtype=torch.float64).cumsum(-1)  # [rows, blocks]
    target = (u.reshape(rows, 1).double() * block_cdf[:, -1:])
    blk = torch.searchsorted(block_cdf, target).clamp_(max=block_cdf.shape[1] - 1)  # [rows, 1]
    before = torch.where(blk > 0, block_cdf.gather(1, (blk - 1).clamp(min=0)), 0.0)
    inner = p.gather(1, blk.unsqueeze(-1).expand(rows, 1, CDF_BLOCK)).squeeze(1).cumsum(-1, dtype=torch.float64)
    # rounding can put the target past the block's own total: then its last entry with mass, never a masked one
    inner_target = torch.minimum(target - before, inner[:, -1:])
    idx = blk * CDF_BLOCK + torch.searchsorted(inner, inner_target).clamp_(max=CDF_BLOCK - 1)
    return idx.view(shape).clamp_(max=k - 1)


@torch.no_grad()
def decode(
    backend: DecodeBackend,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    schedule: Sequence["int | SampleBlock"],
    visual_offset: int,
    *,
    uncond_ids: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
    guidance_scale: float | Sequence[float] = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    return_dists: bool = False,
) -> SampleOutput:
    """Decode one batch. input_ids/attention_mask: [B, L] left-padded conditional prefixes.

    guidance_scale: one scale, or one per sampling entry of the schedule. With any scale != 0,
    uncond_ids/uncond_mask [B, L'] are stacked under the conditional rows (re-padded on the
    left to a common length) into one 2B-row batch.
    visual_offset: token id of visual code 0 (code k is fed back as visual_offset + k).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    per_entry = [codes_at(s) for s in schedule]
    n_steps = sum(1 for n in per_entry if n)
    if isinstance(guidance_scale, (int, float)):
        scales = [float(guidance_scale)] * n_steps
    else:
        scales = [float(g) for g in guidance_scale]
    if len(scales) != n_steps:
        raise ValueError(f"guidance_scale: got {len(scales)} scales for {n_steps} sampling steps")
    if any(g < 0 for g in scales):
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    b = input_ids.shape[0]
    device = input_ids.device
    cfg = any(g != 0.0 for g in scales)
    if cfg:
        if uncond_ids is None or uncond_mask is None:
            raise ValueError("guidance_scale != 0 needs the unconditional prefixes")
        input_ids, attention_mask = stack_left_padded([(input_ids, attention_mask), (uncond_ids, uncond_mask)])

    n_visual = sum(per_entry)
    seeds = make_seeds(seed, b)
    u = row_uniforms(seeds, n_visual, device=device)
    codes = torch.empty(b, n_visual, dtype=torch.long, device=device)
    step_lp = torch.empty(b, n_visual, dtype=torch.float32, device=device)
    dists = [] if return_dists else None

    last = len(schedule) - 1
    logits = backend.prefill(input_ids, attention_mask, need_logits=per_entry[0] > 0)
    j = i = 0
    for t, entry in enumerate(schedule):
        n = per_entry[t]
        if n:
            block = isinstance(entry, SampleBlock)
            lp = sampling_logprobs(logits, b, scales[i], temperature, top_k, top_p)  # [B, (n,) K]
            uj = u[:, j : j + n] if block else u[:, j]
            k = inverse_cdf(lp, uj)
            codes[:, j : j + n] = k.view(b, n)
            step_lp[:, j : j + n] = lp.gather(-1, k.unsqueeze(-1)).view(b, n)
            if dists is not None:
                dists.append(lp.view(b, n, -1))
            tok = k + visual_offset
            j += n
            i += 1
        else:
            tok = torch.full((b,), entry, dtype=torch.long, device=device)
        if t == last:
            break
        if cfg:
            tok = torch.cat([tok, tok])
        logits = backend.step(tok, need_logits=per_entry[t + 1] > 0)
    return SampleOutput(codes, seeds, step_lp, torch.cat(dists, 1) if dists is not None else None)


def stack_left_padded(parts: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack several left-padded (ids, mask) batches into one, re-padding on the left."""
    width = max(ids.shape[1] for ids, _ in parts)
    out_ids, out_mask = [], []
    for ids, mask in parts:
        pad = width - ids.shape[1]
        out_ids.append(F.pad(ids, (pad, 0), value=pad_id))
        out_mask.append(F.pad(mask, (pad, 0), value=0))
    return torch.cat(out_ids), torch.cat(out_mask)
