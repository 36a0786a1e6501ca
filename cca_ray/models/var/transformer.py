"""The VAR transformer (next-scale prediction), in the released checkpoints' parameter layout.

Parameter and buffer names, shapes and order are those of the released ``var_d{16,20,24,30}.pth``
bare state dicts, so they load strictly. The math, per block (AdaLN on the class embedding):

    gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(cond)          # [B, 1, C] each
    x = x + drop_path(attn(LN(x) * (1 + scale1) + shift1) * gamma1)
    x = x + drop_path(ffn(LN(x) * (1 + scale2) + shift2) * gamma2)

with l2-normalised queries/keys times a learnt per-head scale (``attn_l2_norm``). The input is
``[sos | word_embed(teacher-forced scale inputs)] + level embedding + position embedding``,
where the first scale's tokens are the class embedding plus ``pos_start``. The head is a
LayerNorm modulated by the class embedding (AdaLN-before-head) and a linear map to the codebook.

Class dropout never happens here: a null condition is the null class id (``num_classes``),
chosen by the caller, so scoring and sampling are deterministic in eval mode.

Drop-path (stochastic depth, VAR's training regulariser) is drawn from the global generator in train
mode, or, given ``drop_seeds`` (one int per row), from a hash of (row seed, block, branch) in either
mode: the trainer's policy, its frozen reference and the precomputed reference pass then drop the
same branches of the same rows, so CCA's Δ = log p_θ - log p_φ is exactly 0 at step 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cca_ray.models.knob import embedding as knob_embedding

from cca_ray.models.var.layout import PATCH_NUMS, ScaleLayout

RELEASED_DEPTHS = (16, 20, 24, 30)
MAX_SCALE_MUL = math.log(100.0)  # the learnt attention scale is capped at 100


@dataclass(frozen=True)
class VARConfig:
    depth: int
    embed_dim: int
    num_heads: int
    drop_path_rate: float
    num_classes: int = 1000
    vocab_size: int = 4096  # the VQVAE codebook
    vae_channels: int = 32  # Cvae: width of a codebook vector
    patch_nums: tuple[int, ...] = PATCH_NUMS
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False  # the released d16..d30 have one AdaLN projection per block
    attn_l2_norm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", ScaleLayout(self.patch_nums).patch_nums)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def layout(self) -> ScaleLayout:
        return ScaleLayout(self.patch_nums)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d


def var_config(depth: int, **overrides) -> VARConfig:
    """VAR's builder rule: width 64*depth, one head per 64 channels, drop-path 0.1*depth/24."""
    base = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)
    return VARConfig(**{**base, **overrides})


_M32 = 0xFFFFFFFF


def seeded_uniform(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """A uniform [0, 1) per row from int64 row seeds [B] and a salt: a 32-bit integer hash (the
    "lowbias" mixer) on int64 tensors, the same on every device and dtype. float64 [B]."""
    h = ((seeds & _M32) ^ ((seeds >> 32) & _M32) ^ ((salt * 0x9E3779B9) & _M32)) & _M32
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    h = (h >> 16) ^ h
    return h.double() / 2.0**32


def drop_path(x: torch.Tensor, p: float, training: bool, seeds: torch.Tensor | None = None,
              salt: int = 0) -> torch.Tensor:
    """Stochastic depth: drop a residual branch per sample with probability p, rescale survivors.
    Without seeds only in training, from the global generator; with row seeds [B] always, from them."""
    if p == 0.0 or (seeds is None and not training):
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if seeds is None:
        keep = x.new_empty(shape).bernoulli_(1.0 - p)
    else:
        keep = (seeded_uniform(seeds.to(x.device), salt) >= p).to(x.dtype).view(shape)
    return x * keep.div_(1.0 - p)


class KVCache:
    """One layer's keys and values for a whole image, preallocated [rows, heads, L, head_dim].

    Sampling appends one scale per step; a scale's queries attend to every cached key (all
    coarser scales and their own), which is the block-causal mask without building it.
    """

    def __init__(self, rows: int, heads: int, length: int, head_dim: int, *, dtype, device):
        self.k = torch.empty(rows, heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.t = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if self.t + n > self.k.shape[2]:
            raise RuntimeError(f"KV cache holds {self.k.shape[2]} tokens; appending {n} at {self.t}")
        self.k[:, :, self.t : self.t + n] = k
        self.v[:, :, self.t : self.t + n] = v
        self.t += n
        return self.k[:, :, : self.t], self.v[:, :, : self.t]


class SelfAttention(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        c, h = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = h, c // h
        self.attn_l2_norm = cfg.attn_l2_norm
        if cfg.attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, h, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))  # keys carry no bias; kept for the layout
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, kv: KVCache | None = None):
        """x [B, l, C]; attn_bias additive [1, 1, l, l] (teacher forcing) or None with a KV cache."""
        b, n, c = x.shape
        # mat_qkv is called as a module (not F.linear on its weight) so ZeRO-3 gathers it itself
        qkv = self.mat_qkv(x) + torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
            k = F.normalize(k, dim=-1)
        if kv is not None:
            k, v = kv.append(k, v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: VARConfig, drop_path_rate: float, index: int = 0):
        super().__init__()
        c = cfg.embed_dim
        self.C, self.drop_path_rate, self.shared_aln, self.index = c, drop_path_rate, cfg.shared_aln, index
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """Class embedding [B, C] (shared AdaLN: its projection [B, 1, 6, C]) -> [B, 1, 6, C]."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(self, x, mod, attn_bias=None, kv: KVCache | None = None, drop_seeds: torch.Tensor | None = None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias, kv)
        p, salt = self.drop_path_rate, 2 * self.index + 1
        x = x + drop_path(h.mul(gamma1), p, self.training, drop_seeds, salt)
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2))
        return x + drop_path(h.mul(gamma2), p, self.training, drop_seeds, salt + 1)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, eps: float):
        super().__init__()
        self.C = c
        self.ln_wo_grad = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond):
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """forward(labels, x_BLCv_wo_first_l, targets) -> log p(targets | labels) [B], fp32 (nats)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        lay = cfg.layout
        c, self.L, self.first_l = cfg.embed_dim, lay.num_tokens, lay.first_l
        init_std = math.sqrt(1 / c / 3)
        # registration order = the released state dict's key order
        self.pos_start = nn.Parameter(torch.empty(1, lay.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, c))
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=init_std)
        self.register_buffer("lvl_1L", lay.level_ids().view(1, self.L))
        self.register_buffer("attn_bias_for_masking", lay.attn_bias())
        self.word_embed = nn.Linear(cfg.vae_channels, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # the last id is the null class
        self.lvl_embed = nn.Embedding(lay.num_scales, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if cfg.shared_aln else nn.Identity()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # linearly deeper
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, r, i) for i, r in enumerate(rates))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)
        self.gradient_checkpointing = False

    # -- pieces shared by teacher forcing and the next-scale sampler ----------------------
    def modulations(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """Class embeddings [B, C] -> each block's AdaLN parameters [B, 1, 6, C]."""
        shared = self.shared_ada_lin(cond)
        return [blk.modulation(shared) for blk in self.blocks]

    def level_pos(self, begin: int, end: int) -> torch.Tensor:
        """Level + position embedding of flat positions [begin, end): [1, end-begin, C]."""
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def first_scale_input(self, cond: torch.Tensor) -> torch.Tensor:
        """The start tokens: class embedding + pos_start + level/position: [B, first_l, C]."""
        sos = cond.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start
        return sos + self.level_pos(0, self.first_l)

    def scale_input(self, x_BlCv: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """Quantiser features of positions [begin, end) [B, l, Cvae] -> transformer input [B, l, C]."""
        return self.word_embed(x_BlCv.to(self.word_embed.weight.dtype)) + self.level_pos(begin, end)

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Hidden [B, l, C] -> codebook logits [B, l, V] in fp32."""
        return self.head(self.head_nm(h, cond)).float()

    # -- teacher forcing -----------------------------------------------------------------
    def condition(self, labels: torch.Tensor, knob: torch.Tensor | None = None) -> torch.Tensor:
        """The condition vector [B, C] (start tokens and every AdaLN): the class embedding, plus the knob
        embedding of a knob model (cca_ray.models.knob; attached as `cond_knob`, outside the released layout)."""
        cond = self.class_emb(labels)
        offset = knob_embedding(self, knob, labels.shape[0])
        return cond if offset is None else cond + offset.to(cond.dtype)

    def teacher_forced_logits(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                              knob: torch.Tensor | None = None, drop_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """labels [B] class ids (null = num_classes); x [B, L - first_l, Cvae] -> logits [B, L, V] fp32.
        drop_seeds: int64 [B] row seeds of the drop-path draws (module docstring)."""
        cond = self.condition(labels, knob)
        x = torch.cat([self.first_scale_input(cond), self.scale_input(x_BLCv_wo_first_l, self.first_l, self.L)], 1)
        bias = self.attn_bias_for_masking.to(x.dtype)
        for blk, mod in zip(self.blocks, self.modulations(cond)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mod, bias, None, drop_seeds, use_reentrant=False)
            else:
                x = blk(x, mod, bias, None, drop_seeds)
        return self.logits(x, cond)

    def forward(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, targets: torch.Tensor,
                knob: torch.Tensor | None = None, return_logits: bool = False,
                drop_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """targets [B, L] codes -> sum over the L tokens of log-softmax at the target, [B] fp32
        (return_logits: the logits [B, L, V] themselves). knob [B]: a knob model's per-row λ or β;
        drop_seeds [B]: the drop-path draws' row seeds."""
        logits = self.teacher_forced_logits(labels, x_BLCv_wo_first_l, knob, drop_seeds)
        if return_logits:
            return logits
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (picked - logits.logsumexp(-1)).sum(-1)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_var(cfg: VARConfig, device="cpu") -> VAR:
    """A VAR module. On device="meta" nothing is allocated (load weights with assign=True)."""
    with torch.device(device):
        return VAR(cfg)


def init_unit_scale(model: VAR, seed: int) -> VAR:
    """Random weights at unit scale, from a generator of our own (tiny test and demo models).

    Not VAR's training init: that one scales the AdaLN gammas by 1e-5 and the head by 0.02, so a
    fresh model's blocks are nearly the identity and every logit nearly equal, which makes a
    random model useless for telling implementations apart.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_mul_1H11"):
                continue  # keep log(4): the released models' starting attention scale
            fan_in = p.shape[-1] if p.ndim >= 2 else p.numel()
            std = 1.0 if "class_emb" in name or "lvl_embed" in name or "pos_" in name else 1.0 / math.sqrt(fan_in)
            if p.ndim == 1:
                std = 0.1  # biases
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


__all__ = ["VAR", "VARConfig", "KVCache", "RELEASED_DEPTHS", "var_config", "build_var", "init_unit_scale"]
