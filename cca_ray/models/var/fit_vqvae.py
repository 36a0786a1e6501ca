"""Fit a tiny multi-scale VQVAE on the training images (the smoke run's tokenizer; no download).

VAR's VQVAE was trained with a straight-through multi-scale residual quantiser: at each scale the
remaining residual is area-downsampled, snapped to its nearest code, upsampled through phi and
subtracted. The loss is VAR's quantiser loss (codebook term |f_hat - sg(f)|^2 plus a 0.25-weighted
commitment term |sg(f_hat) - f|^2, averaged over scales) plus the pixel reconstruction through the
straight-through f_hat. No perceptual or GAN term: a few hundred Adam steps on 8x8 digits give a
tokenizer whose decodes are recognisable, which is all the smoke run's FID proxy needs.

    fit_tiny_vqvae(images_uint8_NHWC, "vae_tiny.pth", vocab_size=32, patch_nums=(1, 2, 3, 4), downsample=2)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cca_ray.models.var.layout import PATCH_NUMS
from cca_ray.models.var.vqvae import VQVAE, VQVAEConfig

log = logging.getLogger(__name__)

COMMIT_BETA = 0.25  # VAR's quantiser beta


def tiny_patch_nums(last: int) -> tuple[int, ...]:
    """VAR's scales below the last map, then the last: 4 -> (1, 2, 3, 4); 8 -> (1, 2, 3, 4, 5, 6, 8)."""
    if last < 2:
        raise ValueError(f"a multi-scale VQVAE needs a last scale of at least 2x2, got {last}")
    return tuple(p for p in PATCH_NUMS if p < last) + (last,)


def quantize_st(vq: VQVAE, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features f [B, C, H, W] -> (straight-through f_hat, quantiser loss), as VAR trains it."""
    q = vq.quantize
    lay = q.layout
    f_ng = f.detach()
    rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
    e = q.embedding.weight
    loss = f.new_zeros(())
    for si, pn in enumerate(lay.patch_nums):
        z = rest if si == lay.num_scales - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        with torch.no_grad():
            idx = torch.cdist(zf, e.detach()).argmin(1).view(f.shape[0], pn * pn)
        h = q._upsampled(si, q.code_vectors(idx, si))
        f_hat = f_hat + h
        rest = rest - h.detach()
        loss = loss + F.mse_loss(f_hat, f_ng) + COMMIT_BETA * F.mse_loss(f_hat.detach(), f)
    return (f_hat.detach() - f_ng) + f, loss / lay.num_scales


def fit_tiny_vqvae(images: np.ndarray, path, *, vocab_size: int, patch_nums, downsample: int, z_channels: int = 8,
                   ch: int = 32, steps: int = 200, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                   progress: bool = False) -> Path:
    """Train a small VQVAE in VAR's layout on uint8 images [N, H, W, C] and save it as a bare state dict
    (the released file format) at `path`. downsample must be a power of two; H = downsample * last scale."""
    levels = int(np.log2(downsample)) + 1
    if 2 ** (levels - 1) != downsample:
        raise ValueError(f"tokenizer.patch_size (the VQVAE's downsampling) must be a power of two, got {downsample}")
    cfg = VQVAEConfig(vocab_size=vocab_size, z_channels=z_channels, ch=ch, num_res_blocks=1,
                      ch_mult=(1,) * levels, patch_nums=tuple(patch_nums))
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x_all.shape[1] == 1:
        x_all = x_all.expand(-1, 3, -1, -1).contiguous()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vq = VQVAE(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # codebook from encoder features of random images: every code starts in use
            f0 = vq.quant_conv(vq.encoder(x_all[torch.randint(len(x_all), (max(8, vocab_size // 4),), generator=g)]))
            feats = f0.permute(0, 2, 3, 1).reshape(-1, z_channels)
            vq.quantize.embedding.weight.copy_(feats[torch.randint(len(feats), (vocab_size,), generator=g)])
        opt = torch.optim.Adam(vq.parameters(), lr=lr)
        from tqdm.auto import tqdm

        bar = tqdm(range(steps), desc="fitting tiny VQVAE", disable=None if progress else True, leave=False)
        for step in bar:
            x = x_all[torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=g)]
            f_hat, q_loss = quantize_st(vq, vq.quant_conv(vq.encoder(x)))
            rec = vq.decoder(vq.post_quant_conv(f_hat))
            rec_loss = F.mse_loss(rec, x)
            loss = rec_loss + q_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{q_loss.item():.4f}")
        log.info("tiny VQVAE: %d steps, reconstruction mse %.4f, quantiser loss %.4f", steps, rec_loss.item(),
                 q_loss.item())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: t.detach().contiguous() for k, t in vq.state_dict().items()}, path)
    return path
