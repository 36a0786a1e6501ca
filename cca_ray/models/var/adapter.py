"""VAR behind the ARVisualModel protocol: class labels in, 680 codes (ten scales, flat) out.

Conditions are class ids; ``None`` is the null class (id ``num_classes``, 1000 for ImageNet).
log p(image | class) is the sum of the fp32 log-softmax at all 680 targets from one
teacher-forced pass, whose input the frozen quantiser builds from the codes; the quantiser
lives beside ``module`` (not in it), so DeepSpeed wraps exactly the released VAR layout and
the trainer's state dict is a ``var_d*.pth``.

Sampling predicts a whole scale per step with a KV cache (``cca_ray.sample.decode`` with one
``SampleBlock`` per scale). CFG follows VAR's sampler: the guidance scale ramps linearly over
the scales, ``g_k = g * k / (K - 1)`` (``cfg_schedule="linear"``, VAR's default), or stays
constant (``"constant"``); at ``guidance=0`` no unconditional row is built.
"""

from __future__ import annotations

import numbers
from typing import Literal, Sequence

import torch
from torch import nn

from cca_ray.models import knob as knobs
from cca_ray.models.base import Cond
from cca_ray.models.var.quantizer import MultiScaleQuantizer
from cca_ray.models.var.transformer import VAR, KVCache
from cca_ray.sample import SampleBlock, SampleOutput, decode


def guidance_per_scale(guidance: float, num_scales: int, schedule: Literal["linear", "constant"] = "linear") -> list[float]:
    """The CFG scale of each scale step. "linear" is VAR's CFGv2 ramp g * k / (K - 1), so the first
    scale is sampled unguided and the last at g; VAR applies it to logits as (1+t) l_c - t l_u,
    which is our l_c + t (l_c - l_u) on log-probs up to a per-row constant."""
    if schedule == "linear":
        return [guidance * k / (num_scales - 1) for k in range(num_scales)]
    if schedule == "constant":
        return [float(guidance)] * num_scales
    raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


class _ScaleBackend:
    """Decode backend for cca_ray.sample.decode: one forward per scale with a per-layer KV cache.

    prefill gets the class ids [rows, 1] (CFG: conditional rows then null-class rows) and returns
    the first scale's logits; step gets the codes just drawn for scale k [rows, pn_k^2], adds
    their code vectors to f_hat through the quantiser and returns scale k+1's logits [rows, n, V].
    """

    def __init__(self, var: VAR, quant: MultiScaleQuantizer, knob: torch.Tensor | None = None):
        self.var, self.quant, self.knob = var, quant, knob  # knob [rows]: a knob model's per-row λ or β
        self.lay = var.cfg.layout

    def prefill(self, input_ids, attention_mask, need_logits):
        var, cfg = self.var, self.var.cfg
        rows, dev = input_ids.shape[0], input_ids.device
        self.cond = var.condition(input_ids[:, 0], self.knob)
        self.mods = var.modulations(self.cond)  # the class is fixed: AdaLN parameters once per image
        head_dim = cfg.embed_dim // cfg.num_heads
        dtype = var.head.weight.dtype
        self.caches = [KVCache(rows, cfg.num_heads, self.lay.num_tokens, head_dim, dtype=dtype, device=dev)
                       for _ in var.blocks]
        hw = self.lay.patch_nums[-1]
        self.f_hat = torch.zeros(rows, cfg.vae_channels, hw, hw, device=dev)
        self.si = 0
        return self._run(var.first_scale_input(self.cond))

    def step(self, codes, need_logits):
        si = self.si
        self.f_hat, nxt = self.quant.next_input(si, self.f_hat, self.quant.code_vectors(codes, si))
        self.si = si + 1
        begin, end = self.lay.begin_ends[self.si]
        return self._run(self.var.scale_input(nxt.flatten(2).transpose(1, 2), begin, end))

    def _run(self, x):
        for blk, mod, kv in zip(self.var.blocks, self.mods, self.caches):
            x = blk(x, mod, None, kv)
        return self.var.logits(x, self.cond)


class VARAdapter:
    """ARVisualModel over a VAR transformer and its VQVAE's quantiser."""

    family = "var"
    condition_kind = "label"
    max_prompt_tokens = 1
    frozen_prefixes: tuple[str, ...] = ()  # the quantiser is not inside `module`
    has_cfg_schedule = True  # generate() takes cfg_schedule (sample.cfg_schedule)
    takes_drop_seeds = True  # sequence_logprob(..., drop_seeds=): drop-path drawn from per-row seeds

    def __init__(self, var: VAR, quant: MultiScaleQuantizer, *, vae_file=None):
        cfg = var.cfg
        if (quant.vocab_size, quant.Cvae, quant.layout) != (cfg.vocab_size, cfg.vae_channels, cfg.layout):
            raise ValueError(f"VQVAE (codebook {quant.vocab_size}x{quant.Cvae}, scales {quant.layout.patch_nums}) does "
                             f"not fit the VAR (codebook {cfg.vocab_size}x{cfg.vae_channels}, scales {cfg.patch_nums})")
        self.module, self.quant, self.vae_file = var, quant, vae_file
        self.cfg, self.layout = cfg, cfg.layout
        self.codebook_size, self.num_classes = cfg.vocab_size, cfg.num_classes
        self.code_shape = (self.layout.num_tokens,)
        self.grid = self.layout.grid
        self.condition_dim = cfg.embed_dim

    @property
    def device(self) -> torch.device:
        return self.module.pos_start.device

    def _quant(self) -> MultiScaleQuantizer:
        """The quantiser on the module's device (DeepSpeed moves `module`, not the adapter)."""
        if self.quant.embedding.weight.device != self.device:
            self.quant.to(self.device)
        return self.quant

    # -- conditions ---------------------------------------------------------------------
    def encode_conditions(self, raw: Sequence[int | None], grid: tuple[int, int] | None = None) -> Cond:
        """Class ids (None = null class) -> Cond with input_ids [B, 1]. `grid`, if given, must be the last scale."""
        if grid is not None and tuple(grid) != self.grid:
            raise ValueError(f"VAR generates {self.grid[0]}x{self.grid[1]} final maps; got grid {tuple(grid)}")
        ids = []
        for i, c in enumerate(raw):
            if c is None:
                ids.append(self.num_classes)
            elif isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c) < self.num_classes:
                raise ValueError(f"condition {i}: expected a class id in [0, {self.num_classes}) or None, got {c!r}")
            else:
                ids.append(int(c))
        input_ids = torch.tensor(ids, dtype=torch.long).view(-1, 1)
        return Cond(input_ids, torch.ones_like(input_ids), self.grid).to(self.device)

    def null_condition(self, n: int, grid: tuple[int, int] | None = None) -> Cond:
        return self.encode_conditions([None] * n, grid)

    def condition_length(self, raw) -> int:
        return 1

    # -- scoring ------------------------------------------------------------------------
    def scoring_inputs(self, cond: Cond, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced inputs of VAR.forward. codes: LongTensor[B, 680] (scales flat, VAR's order)."""
        if codes.ndim != 2 or codes.shape[1] != self.layout.num_tokens:
            raise ValueError(f"codes must be [B, {self.layout.num_tokens}] (scales {self.layout.patch_nums} flat), "
                             f"got {list(codes.shape)}")
        if len(codes) != len(cond):
            raise ValueError(f"{len(codes)} code rows for {len(cond)} conditions")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, {int(codes.max())}]")
        codes = codes.to(self.device).long()
        x = self._quant().var_input(self.layout.split(codes))
        knob = {"knob": cond.knob.to(self.device)} if cond.knob is not None else {}
        return dict(labels=cond.input_ids[:, 0].to(self.device), x_BLCv_wo_first_l=x, targets=codes, **knob)

    def sequence_logprob(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None,
                         drop_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """log p(codes | class) [B] fp32 (nats), summed over the 680 tokens; `module` may be a DeepSpeed engine.
        drop_seeds (int64 [B]): drop-path from these row seeds, in train or eval mode (transformer.py)."""
        inputs = self.scoring_inputs(cond, codes)
        if drop_seeds is not None:
            inputs["drop_seeds"] = torch.as_tensor(drop_seeds, dtype=torch.long).to(self.device)
        return (module or self.module)(**inputs)

    def token_logits(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """Logits fp32 [B, 680, V] at every code (scales flat), one teacher-forced pass."""
        return (module or self.module)(**self.scoring_inputs(cond, codes), return_logits=True)

    # -- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        *,
        guidance: float = 0.0,
        cfg_schedule: Literal["linear", "constant"] = "linear",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
        return_dists: bool = False,
        cca_lambda: float | None = None,
        guidance_beta: float | None = None,
    ) -> SampleOutput:
        """Next-scale sampling. codes [B, 680]; step_logprobs [B, 680] under the sampling distribution."""
        scales = guidance_per_scale(guidance, self.layout.num_scales, cfg_schedule)
        cfg_on = any(g != 0.0 for g in scales)
        unc = self.null_condition(len(cond)) if cfg_on else None
        knob = knobs.decode_values(self.module, len(cond), cfg_on, cca_lambda=cca_lambda,
                                   guidance_beta=guidance_beta, device=self.device)
        return decode(
            _ScaleBackend(self.module, self._quant(), knob),
            cond.input_ids,
            cond.attention_mask,
            [SampleBlock(n) for n in self.layout.lengths],
            0,
            uncond_ids=unc.input_ids if unc is not None else None,
            uncond_mask=unc.attention_mask if unc is not None else None,
            guidance_scale=scales if cfg_on else 0.0,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            return_dists=return_dists,
        )

    def generate(self, cond: Cond, **kw) -> torch.Tensor:
        """LongTensor[B, 680]; see sample() for the options (cfg_schedule included)."""
        was_training = self.module.training
        self.module.eval()
        try:
            return self.sample(cond, **kw).codes
        finally:
            self.module.train(was_training)

    # -- training hooks -----------------------------------------------------------------
    def external_parameters(self) -> list[nn.Parameter]:
        """Weights read outside their own submodule's forward, which ZeRO-3 must gather for the root:
        shared AdaLN's per-block ``ada_gss`` (the root computes every block's modulation once).
        The released per-block AdaLN models have none (mat_qkv is called as a module)."""
        return [blk.ada_gss for blk in self.module.blocks if self.cfg.shared_aln]

    def enable_gradient_checkpointing(self) -> None:
        self.module.gradient_checkpointing = True

    def save(self, path) -> None:
        from cca_ray.models.var.checkpoint import save_var

        save_var(self, path)
