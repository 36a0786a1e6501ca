"""VAR's multi-scale residual quantiser (codebook + phi convs), in the released VQVAE's layout.

Quantising a feature map f [B, Cvae, H, W] (H = W = the last scale) walks the scales coarse to
fine: area-downsample what is left of f to the scale's size, take each vector's nearest
codebook entry, upsample those entries back to H x W (bicubic), pass them through phi (a 3x3
conv mixed with the identity, ``(1-r) h + r conv(h)``), add to the reconstruction f_hat and
subtract from the rest. Four phi convs are shared over the ten scales: scale k uses the one
whose tick is nearest to k / (K-1).

The same walk, given the codes, rebuilds f_hat; the model's input for scale k+1 is the f_hat
after scale k area-downsampled to scale k+1's size (teacher forcing and sampling alike).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cca_ray.models.var.layout import PATCH_NUMS, ScaleLayout


class Phi(nn.Conv2d):
    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h):
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    def __init__(self, phis: nn.ModuleList):
        super().__init__()
        self.qresi_ls = phis
        k = len(phis)
        # VAR's placement of the shared convs over [0, 1]
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def index(self, at: float) -> int:
        return int(np.argmin(np.abs(self.ticks - at)))


class MultiScaleQuantizer(nn.Module):
    """Key names as the released VQVAE's ``quantize.*``. Frozen: no method here needs gradients."""

    def __init__(self, vocab_size: int = 4096, vae_channels: int = 32, patch_nums=PATCH_NUMS,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        if share_quant_resi < 2:
            raise ValueError(f"share_quant_resi={share_quant_resi}: only the released, partially shared phi "
                             "(share_quant_resi >= 2) is supported")
        self.layout = ScaleLayout(patch_nums)
        self.vocab_size, self.Cvae = vocab_size, vae_channels
        self.quant_resi = PhiPartiallyShared(nn.ModuleList(Phi(vae_channels, quant_resi) for _ in range(share_quant_resi)))
        # codebook usage statistics of VQVAE training; unused here, kept so the layout loads strictly
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(self.layout.num_scales, vocab_size))
        self.embedding = nn.Embedding(vocab_size, vae_channels)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.qresi_ls[self.quant_resi.index(si / (self.layout.num_scales - 1))]

    def _upsampled(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """Scale si's code vectors [B, C, pn, pn] -> phi(upsampled to H x W)."""
        hw = self.layout.patch_nums[-1]
        if si != self.layout.num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(hw, hw), mode="bicubic")
        return self.phi(si)(h_BChw)

    def code_vectors(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        """Codes of scale si [B, pn*pn] -> codebook vectors [B, Cvae, pn, pn] (fp32)."""
        pn = self.layout.patch_nums[si]
        return self.embedding(idx_Bl).float().transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)

    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor, return_fhat: bool = False):
        """Encoder features [B, Cvae, H, W] -> codes per scale [[B, pn*pn], ...] (and f_hat after each scale)."""
        f = f_BChw.float()
        b, c, h, w = f.shape
        lay = self.layout
        if (h, w) != lay.grid:
            raise ValueError(f"feature map is {h}x{w}; the last scale is {lay.grid[0]}x{lay.grid[1]}")
        rest, f_hat = f.clone(), torch.zeros_like(f)
        e = self.embedding.weight.float()
        e2 = e.square().sum(1)
        codes, fhats = [], []
        for si, pn in enumerate(lay.patch_nums):
            z = rest if si == lay.num_scales - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            # squared distance |z|^2 + |e|^2 - 2 z.e, in the order VAR computes it (ties break alike)
            d = torch.addmm(z.square().sum(1, keepdim=True) + e2, z, e.T, beta=1, alpha=-2)
            idx = d.argmin(1).view(b, pn * pn)
            h_up = self._upsampled(si, self.code_vectors(idx, si))
            f_hat.add_(h_up)
            rest.sub_(h_up)
            codes.append(idx)
            fhats.append(f_hat.clone())
        return (codes, fhats) if return_fhat else codes

    @torch.no_grad()
    def idx_to_fhat(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Codes per scale -> the cumulative reconstruction f_hat [B, Cvae, H, W] after each scale."""
        b, hw = codes[0].shape[0], self.layout.patch_nums[-1]
        f_hat = torch.zeros(b, self.Cvae, hw, hw, device=codes[0].device)
        out = []
        for si, idx in enumerate(codes):
            f_hat = f_hat + self._upsampled(si, self.code_vectors(idx, si))
            out.append(f_hat)
        return out

    @torch.no_grad()
    def next_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's code vectors [B, Cvae, pn, pn] to f_hat; return (f_hat, the next scale's
        input [B, Cvae, pn', pn']), or (f_hat, f_hat) after the last scale. f_hat is updated in place."""
        f_hat.add_(self._upsampled(si, h_BChw.float()))
        if si == self.layout.num_scales - 1:
            return f_hat, f_hat
        pn = self.layout.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    @torch.no_grad()
    def var_input(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input: codes per scale -> [B, L - first_l, Cvae] fp32, every scale but the
        first, each the f_hat of the scales before it area-downsampled to its size, row-major."""
        b, hw = codes[0].shape[0], self.layout.patch_nums[-1]
        f_hat = torch.zeros(b, self.Cvae, hw, hw, device=codes[0].device)
        nxt = []
        for si in range(self.layout.num_scales - 1):
            f_hat, x = self.next_input(si, f_hat, self.code_vectors(codes[si], si))
            nxt.append(x.flatten(2).transpose(1, 2))
        return torch.cat(nxt, 1)
