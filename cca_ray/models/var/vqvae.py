"""VAR's multi-scale VQVAE (``vae_ch160v4096z32.pth``), in the released parameter layout.

A VQGAN-style conv encoder (ch * (1, 1, 2, 2, 4), two ResNet blocks per level, self-attention at
the lowest resolution, downsampling 16x) maps an image in [-1, 1] to f [B, Cvae, 16, 16];
``quant_conv`` then the multi-scale quantiser turn f into ten index maps; decoding rebuilds f_hat
from the codes and runs ``post_quant_conv`` and the mirrored decoder. The configuration is read
off the state dict's shapes, except the two numbers a state dict does not hold (the scales and
phi's residual ratio), which default to the release's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cca_ray.models.var.layout import PATCH_NUMS
from cca_ray.models.var.quantizer import MultiScaleQuantizer


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    patch_nums: tuple[int, ...] = PATCH_NUMS

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1-conv q, k, v)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        att = torch.bmm(q.transpose(1, 2), k).mul_(c**-0.5).softmax(-1)  # [B, query, key]
        return x + self.proj_out(torch.bmm(v, att.transpose(1, 2)).view(b, c, h, w))


class Downsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the VQGAN encoder


class Upsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks, attn, resample_name=None, resample=None) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(m, resample_name, resample)
    return m


def _mid(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            blocks = [ResnetBlock(cin if j == 0 else ch * m, ch * m) for j in range(n)]
            cin = ch * m
            attn = [AttnBlock(cin) for _ in range(n)] if last else []
            self.down.append(_level(blocks, attn, "downsample", None if last else Downsample2x(cin)))
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, blk in enumerate(level.block):
                h = blk(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, 1, 1)
        self.mid = _mid(cin)
        levels = []
        for i in reversed(range(len(mult))):
            blocks = [ResnetBlock(cin if j == 0 else ch * mult[i], ch * mult[i]) for j in range(n + 1)]
            cin = ch * mult[i]
            attn = [AttnBlock(cin) for _ in range(n + 1)] if i == len(mult) - 1 else []
            levels.insert(0, _level(blocks, attn, "upsample", Upsample2x(cin) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, blk in enumerate(level.block):
                h = blk(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> codes per scale [[B, pn*pn], ...]."""

    def __init__(self, cfg: VQVAEConfig = VQVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums,
                                            cfg.quant_resi, cfg.share_quant_resi)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idx(self.quant_conv(self.encoder(img)))

    @torch.no_grad()
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))).clamp_(-1, 1)

    @torch.no_grad()
    def idx_to_img(self, codes: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idx_to_fhat(codes)[-1])


# -- reading the configuration off a state dict, and loading ---------------------------
def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.fullmatch(k))})


def config_from_state_dict(sd: dict, **given) -> VQVAEConfig:
    """VQVAEConfig whose shapes match `sd` (a released or tiny VQVAE); `given` sets patch_nums/quant_resi."""
    try:
        v, z = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a VAR VQVAE state dict (no {e.args[0]})") from None
    levels = _count(sd, r"encoder\.down\.(\d+)\..*")
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    found = dict(vocab_size=v, z_channels=z, ch=ch, ch_mult=mult,
                 num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\..*"),
                 share_quant_resi=_count(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight"))
    return VQVAEConfig(**found, **{k: (tuple(x) if k == "patch_nums" else x) for k, x in given.items() if x is not None})


def read_state_dict(path) -> dict:
    """A bare state dict from a .pth file, memory-mapped where the file allows (no copy in RAM)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError(f"{path}: expected a bare state dict (name -> tensor), as VAR releases its weights")
    return sd


def load_strict(module: nn.Module, sd: dict, where: str) -> None:
    """load_state_dict(strict=True, assign=True) with an error that names the file and the keys."""
    missing = sorted(set(module.state_dict()) - set(sd))
    unexpected = sorted(set(sd) - set(module.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{where}: does not match the expected layout: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    module.load_state_dict(sd, strict=True, assign=True)


def load_vqvae(path, *, patch_nums=None, quant_resi=None, device="cpu") -> VQVAE:
    """The VQVAE from a bare state dict file such as ``vae_ch160v4096z32.pth`` (frozen, eval mode)."""
    sd = read_state_dict(path)
    try:
        cfg = config_from_state_dict(sd, patch_nums=patch_nums, quant_resi=quant_resi)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = VQVAE(cfg)
    sd = _fit_usage_stats(sd, cfg)
    load_strict(model, sd, str(path))
    return model.to(device).eval().requires_grad_(False)


def _fit_usage_stats(sd: dict, cfg: VQVAEConfig, prefix: str = "quantize.") -> dict:
    """The codebook-usage buffer has one row per scale of VQVAE training; it is never read, so a
    VQVAE trained with other scales keeps loading (VAR's own loader does the same)."""
    key = prefix + "ema_vocab_hit_SV"
    if key in sd and sd[key].shape[0] != len(cfg.patch_nums):
        sd = {**sd, key: torch.zeros(len(cfg.patch_nums), cfg.vocab_size)}
    return sd


def load_quantizer(path, *, patch_nums=None, quant_resi=None, device="cpu") -> MultiScaleQuantizer:
    """Only the quantiser (codebook + phi) of a VQVAE file: what scoring and sampling need."""
    sd = read_state_dict(path)
    try:
        cfg = config_from_state_dict(sd, patch_nums=patch_nums, quant_resi=quant_resi)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    sub = {k[len("quantize."):]: t for k, t in _fit_usage_stats(sd, cfg).items() if k.startswith("quantize.")}
    with torch.device("meta"):
        q = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums, cfg.quant_resi, cfg.share_quant_resi)
    load_strict(q, sub, f"{path} (quantize.*)")
    return q.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def build_tiny_vqvae(path, *, vocab_size: int = 64, z_channels: int = 8, ch: int = 32, num_res_blocks: int = 1,
                     ch_mult=(1, 1, 2, 2, 4), patch_nums=PATCH_NUMS, seed: int = 0) -> Path:
    """Save a random-init VQVAE in the released file format (a bare state dict) at `path`.
    Fewer levels in ch_mult downsample less (2 ** (levels - 1)): small images for CPU smoke runs."""
    cfg = VQVAEConfig(vocab_size=vocab_size, z_channels=z_channels, ch=ch, num_res_blocks=num_res_blocks,
                      ch_mult=tuple(ch_mult), patch_nums=tuple(patch_nums))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQVAE(cfg)
        with torch.no_grad():
            model.quantize.embedding.weight.normal_()  # unit-scale codebook: distinct nearest codes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
