"""Batched KV-cache decoding of code grids, guidance-free or with classifier-free guidance.

The sampler knows nothing about a model family. An adapter hands it

* a *backend* with ``prefill(input_ids, attention_mask, need_logits)`` and
  ``step(token_ids, need_logits)`` returning visual-slice logits ``[rows, K]`` (or None), and
* a *schedule*: one entry per decoded position, ``-1`` where a visual code is sampled and a
  token id where the layout forces a token (Emu3's end-of-line after every row).

Every row of a batch shares the layout, so the constraint is one decision per step for the
whole batch, never a per-sample Python loop.

Guidance convention (as in the CCA paper): ``l = l_c + s * (l_c - l_u)`` on log-probabilities,
so ``guidance_scale = 0`` is plain conditional sampling. At ``s == 0`` the unconditional rows
are not built at all: one forward of B rows per token. With ``s > 0`` conditional and
unconditional rows go through one batched forward of 2B rows that share a KV-cache layout.

Per-row seeds: each row draws its uniforms from its own generator and samples by inverse CDF,
so a row's tokens depend on its seed and its distribution only, not on which other requests
shared the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


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
    """Visual-slice logits of the forward's rows -> the sampling distribution (log-probs) [B, K].

    Rows [0, n_cond) are conditional; rows [n_cond, 2 n_cond) unconditional when guidance is on.
    """
    lp_c = F.log_softmax(logits[:n_cond].float(), dim=-1)
    if guidance_scale != 0.0:
        lp_u = F.log_softmax(logits[n_cond : 2 * n_cond].float(), dim=-1)
        lp_c = lp_c + guidance_scale * (lp_c - lp_u)
    if temperature != 1.0:
        lp_c = lp_c / temperature
    lp_c = filter_logprobs(lp_c, top_k, top_p)
    return F.log_softmax(lp_c, dim=-1)


def inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of exp(logp) [B, K] with uniforms u [B] in (0, 1]."""
    cdf = logp.double().exp().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_(max=logp.shape[-1] - 1)


@torch.no_grad()
def decode(
    backend: DecodeBackend,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    schedule: Sequence[int],
    visual_offset: int,
    *,
    uncond_ids: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    return_dists: bool = False,
) -> SampleOutput:
    """Decode one batch. input_ids/attention_mask: [B, L] left-padded conditional prefixes.

    With guidance_scale != 0, uncond_ids/uncond_mask [B, L'] are stacked under the
    conditional rows (re-padded on the left to a common length) into one 2B-row batch.
    visual_offset: token id of visual code 0 (code k is fed back as visual_offset + k).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    b = input_ids.shape[0]
    device = input_ids.device
    cfg = guidance_scale != 0.0
    if cfg:
        if uncond_ids is None or uncond_mask is None:
            raise ValueError("guidance_scale != 0 needs the unconditional prefixes")
        input_ids, attention_mask = stack_left_padded([(input_ids, attention_mask), (uncond_ids, uncond_mask)])

    n_visual = sum(1 for s in schedule if s < 0)
    seeds = make_seeds(seed, b)
    u = row_uniforms(seeds, n_visual, device=device)
    codes = torch.empty(b, n_visual, dtype=torch.long, device=device)
    step_lp = torch.empty(b, n_visual, dtype=torch.float32, device=device)
    dists = [] if return_dists else None

    last = len(schedule) - 1
    logits = backend.prefill(input_ids, attention_mask, need_logits=schedule[0] < 0)
    j = 0
    for t, forced in enumerate(schedule):
        if forced < 0:
            lp = sampling_logprobs(logits, b, guidance_scale, temperature, top_k, top_p)
            k = inverse_cdf(lp, u[:, j])
            codes[:, j] = k
            step_lp[:, j] = lp.gather(-1, k.unsqueeze(-1)).squeeze(-1)
            if dists is not None:
                dists.append(lp)
            tok = k + visual_offset
            j += 1
        else:
            tok = torch.full((b,), forced, dtype=torch.long, device=device)
        if t == last:
            break
        if cfg:
            tok = torch.cat([tok, tok])
        logits = backend.step(tok, need_logits=schedule[t + 1] < 0)
    return SampleOutput(codes, seeds, step_lp, torch.stack(dists, 1) if dists is not None else None)


def stack_left_padded(parts: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack several left-padded (ids, mask) batches into one, re-padding on the left."""
    width = max(ids.shape[1] for ids, _ in parts)
    out_ids, out_mask = [], []
    for ids, mask in parts:
        pad = width - ids.shape[1]
        out_ids.append(F.pad(ids, (pad, 0), value=pad_id))
        out_mask.append(F.pad(mask, (pad, 0), value=0))
    return torch.cat(out_ids), torch.cat(out_mask)
