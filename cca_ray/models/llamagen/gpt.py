"""LlamaGen's class-conditional GPT (c2i), in the parameter layout of the released files.

Sequence of one image (N = (image_size / downsample_size)^2 codes in raster order):

    position   0          1       2             N - 1
    input      [class]    x_0     x_1    ...    x_{N-2}
    predicts   x_0        x_1     x_2    ...    x_{N-1}

The class token is one row of ``cls_embedding.embedding_table``; its extra last row
(index num_classes) is the null class, present when the checkpoint was trained with label
dropout (``class_dropout_prob > 0``). The logits are over the codebook: the output head *is*
the visual vocabulary (16384 codes for VQ-16).

Math, as LlamaGen computes it:

* 2-D RoPE: of each head's d/2 rotary pairs, the first d/4 rotate by the code's row, the last
  d/4 by its column; a pair is two *adjacent* channels (2k, 2k+1). The class position's
  cos/sin rows are zero, so the class token's query and key are zero vectors.
* RMSNorm and RoPE run in fp32 and cast back to the activations' dtype.
* SwiGLU with hidden size find_multiple(int(2 * 4 * dim / 3), 256); no biases anywhere.
* No dropout of any kind: scoring must be deterministic (Δ = 0 exactly at step 0), and the
  class is never replaced by the null class here: callers pass the null class explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cca_ray.models.knob import embedding as knob_embedding


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (LlamaGen's SwiGLU width rule)."""
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class GPTSize:
    n_layer: int
    n_head: int
    dim: int


# LlamaGen's --gpt-model names (the released c2i files: B, L, XL, XXL, 3B); doubles as CLI choices.
# Parameter counts with 16384 codes and 1001 classes, as LlamaGen's README states them.
GPT_MODELS: dict[str, GPTSize] = {
    "GPT-tiny": GPTSize(n_layer=2, n_head=2, dim=64),  # ours: tests and the demo
    "GPT-B": GPTSize(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": GPTSize(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": GPTSize(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": GPTSize(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": GPTSize(n_layer=48, n_head=40, dim=2560),  # 3.9B
    "GPT-1B": GPTSize(n_layer=22, n_head=32, dim=2048),  # 1.2B
    "GPT-3B": GPTSize(n_layer=24, n_head=32, dim=3200),  # 3.1B
    "GPT-7B": GPTSize(n_layer=32, n_head=32, dim=4096),  # 6.6B
}


@dataclass(frozen=True)
class GPTConfig:
    """Everything that fixes the shapes and the math; saved in the cca_ray.json sidecar."""

    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int = 16384  # codebook size of the image tokenizer
    num_classes: int = 1000
    null_class_row: bool = True  # LlamaGen adds it when class_dropout_prob > 0
    cls_token_num: int = 1
    block_size: int = 256  # N, the number of image tokens: (image_size / downsample_size)^2

    def __post_init__(self):
        if self.cls_token_num != 1:
            # LlamaGen's c2i embedder makes one class token whatever cls_token_num says; with more
            # RoPE rows than tokens its own forward misaligns logits and targets.
            raise ValueError(f"cls_token_num={self.cls_token_num}: LlamaGen's class-conditional GPT uses exactly 1")
        if self.dim % self.n_head or self.head_dim % 4:
            raise ValueError(f"dim {self.dim} / n_head {self.n_head}: head size must be a multiple of 4 for 2-D RoPE")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.kv_heads}")
        if int(self.block_size**0.5) ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return int(self.block_size**0.5)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.null_class_row else None

    def to_dict(self) -> dict:
        return asdict(self)


def rope_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """cos/sin table float32 [cls_token_num + grid_size**2, head_dim // 2, 2] (last axis: cos, sin).

    Rows [0, cls_token_num) are zero (LlamaGen's class position); row cls_token_num + i*g + j
    rotates pair k < head_dim/4 by i * f_k and pair head_dim/4 + k by j * f_k, with
    f_k = 1 / base ** (2k / (head_dim / 2)). Always built on the CPU in fp32: it is a constant of the
    architecture, not a parameter, and must not follow the module into bf16.
    """
    half, quarter = head_dim // 2, head_dim // 4
    # the same float ops as LlamaGen (exponent 2k/half, then the reciprocal), so tables agree bit for bit
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float32, device="cpu") * 2.0 / half)
    pos = torch.arange(grid_size, dtype=torch.float32, device="cpu")
    ang = torch.outer(pos, freqs)  # [g, d/4]
    angles = torch.cat([ang[:, None, :].expand(-1, grid_size, -1), ang[None, :, :].expand(grid_size, -1, -1)], -1)
    table = torch.stack([angles.cos(), angles.sin()], -1).flatten(0, 1)  # [g*g, d/2, 2]
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2, device="cpu"), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs. x [B, T, H, d]; rope [T, d/2, 2] fp32. Returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, d/2, 2]
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # normalise in fp32, cast back, *then* scale: the order LlamaGen's bf16 runs used
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project(self, x: torch.Tensor, rope: torch.Tensor):
        """x [B, T, dim] -> q [B, H, T, d], k and v [B, H_kv, T, d], RoPE applied to q and k."""
        b, t, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(b, t, self.n_kv_head, self.head_dim), rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:
        """q [B, H, Tq, d] over k, v [B, H_kv, Tk, d] -> [B, Tq, dim] after the output projection."""
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(o.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.project(x, rope), causal=True)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class id -> one token embedding. No label dropout: the null class is passed explicitly."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + int(cfg.null_class_row), cfg.dim)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        """class_ids [B] -> [B, 1, dim]."""
        return self.embedding_table(class_ids).unsqueeze(1)


class LlamaGenGPT(nn.Module):
    """The c2i Transformer with LlamaGen's state-dict keys; forward() scores code sequences.

    This is the module DeepSpeed wraps: forward(class_ids, codes) -> log p(codes | class) [B]
    fp32. Every parameter is read through its own submodule's forward (the head included),
    so ZeRO-3 needs no external parameters.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # a plain attribute, not a buffer: keeps it fp32 under module.to(bf16) and out of the
        # state dict (the released files may carry a stale copy named freqs_cis; loaders drop it)
        self._rope = rope_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)

    def rope(self, device) -> torch.Tensor:
        """The RoPE table [1 + N, d/2, 2] float32 on `device` (moved once, then cached)."""
        if self._rope.device != torch.device(device):
            self._rope = self._rope.to(device)
        return self._rope

    def class_token(self, class_ids: torch.Tensor, knob: torch.Tensor | None = None) -> torch.Tensor:
        """The condition token [B, 1, dim]: the class embedding, plus the knob embedding of a knob model
        (cca_ray.models.knob; attached as `cond_knob`, outside the released layout)."""
        x = self.cls_embedding(class_ids)
        offset = knob_embedding(self, knob, class_ids.shape[0])
        return x if offset is None else x + offset.to(x.dtype).unsqueeze(1)

    def hidden_states(self, class_ids: torch.Tensor, input_codes: torch.Tensor,
                      knob: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced pass. class_ids [B]; input_codes [B, T-1] (T <= N) -> final-norm states [B, T, dim]."""
        x = torch.cat([self.class_token(class_ids, knob), self.tok_embeddings(input_codes)], 1)
        rope = self.rope(x.device)[: x.shape[1]]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, use_reentrant=False)
            else:
                x = layer(x, rope)
        return self.norm(x)

    def logits(self, class_ids: torch.Tensor, input_codes: torch.Tensor, knob: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, vocab] fp32: position t predicts code t."""
        return self.output(self.hidden_states(class_ids, input_codes, knob)).float()

    def forward(self, class_ids: torch.Tensor, codes: torch.Tensor, knob: torch.Tensor | None = None,
                return_logits: bool = False) -> torch.Tensor:
        """log p(codes | class): class_ids [B], codes [B, N] raster order -> Tensor[B] float32 (nats),
        the sum over the N image tokens of fp32 log-softmax over the codebook (return_logits: the
        logits [B, N, vocab] themselves). knob [B]: a knob model's per-row λ or β."""
        logits = self.logits(class_ids, codes[:, :-1], knob)
        if return_logits:
            return logits
        logp = logits.log_softmax(-1)
        return logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(-1)
