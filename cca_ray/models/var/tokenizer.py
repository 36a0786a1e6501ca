"""VAR's multi-scale VQVAE as an image tokenizer (kind ``var-vqvae``).

An image (uint8 [256, 256, 3]) becomes ten index maps (1x1 ... 16x16), stored flat as
int32 [680] in VAR's order; decoding rebuilds f_hat from all ten and runs the decoder.
``tokenizer.path`` is the VQVAE file (``vae_ch160v4096z32.pth`` or one in that format).
The identity carries the scale layout (``grid`` = the last scale, ``code_shape`` = [680],
``scales``), so shards made with it say how to split their codes.

Pixels map to [-1, 1] as VAR's data pipeline does; a 1-channel image is repeated to RGB on
the way in and averaged back on the way out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cca_ray.models.var.layout import PATCH_NUMS
from cca_ray.models.var.vqvae import load_vqvae
from cca_ray.tokenizers.base import ImageTokenizer

VERSION = "var-vqvae/1"


class VARVQVAETokenizer(ImageTokenizer):
    kind = "var-vqvae"
    needs_fit = False

    def __init__(self, path: str | Path, image_size: int = 256, channels: int = 3, codebook_size: int | None = None,
                 patch_size: int | None = None, device: str | None = None, patch_nums=None,
                 quant_resi: float | None = None, batch_size: int = 16):
        self.path = Path(path).expanduser().resolve()
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_vqvae(self.path, patch_nums=patch_nums, quant_resi=quant_resi, device=self.device)
        cfg = self.model.cfg
        layout = self.model.quantize.layout
        # the config names numbers the checkpoint fixes; a mismatch is a config error
        if codebook_size is not None and codebook_size != cfg.vocab_size:
            raise ValueError(f"tokenizer.codebook_size={codebook_size} but {self.path} has {cfg.vocab_size} codes")
        if patch_size is not None and patch_size != cfg.downsample:
            raise ValueError(f"tokenizer.patch_size={patch_size} but the VQVAE at {self.path} "
                             f"downsamples by {cfg.downsample}")
        if image_size != cfg.downsample * layout.patch_nums[-1]:
            raise ValueError(f"data.image_size must be {cfg.downsample * layout.patch_nums[-1]} for this VQVAE "
                             f"(last scale {layout.patch_nums[-1]} x downsampling {cfg.downsample}), got {image_size}; "
                             f"a VQVAE trained at other scales needs its patch_nums")
        if channels not in (1, 3):
            raise ValueError(f"var-vqvae tokenizer takes 1- or 3-channel images, got {channels}")
        self.layout = layout
        self.codebook_size = cfg.vocab_size
        self.grid = layout.grid
        self.scales = layout.patch_nums
        self._ckpt_id: str | None = None

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.layout.num_tokens,)

    @classmethod
    def from_config(cls, tok_cfg, image_size: int, channels: int, device: str | None = None) -> "VARVQVAETokenizer":
        if not tok_cfg.path:
            raise ValueError("tokenizer.kind=var-vqvae needs tokenizer.path (a VAR VQVAE file, e.g. vae_ch160v4096z32.pth)")
        return cls(tok_cfg.path, image_size, channels, tok_cfg.codebook_size, tok_cfg.patch_size, device)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> int32 [N, 680] (ten scales, flat)."""
        images = self.check_images(images)
        out = []
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[s : s + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float()
            x = x / 127.5 - 1.0
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(self.layout.join(self.model.img_to_idx(x)).to(torch.int32).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, *self.code_shape), dtype=np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int [N, 680] -> uint8 [N, H, W, C]."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.layout.num_tokens:
            raise ValueError(f"codes must be [N, {self.layout.num_tokens}] (scales {self.scales} flat), "
                             f"got {list(codes.shape)}")
        if len(codes) and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{codes.min()}, {codes.max()}]")
        out = []
        for s in range(0, len(codes), self.batch_size):
            idx = torch.as_tensor(codes[s : s + self.batch_size], dtype=torch.long, device=self.device)
            img = self.model.idx_to_img(self.layout.split(idx)).float()
            if self.channels == 1:
                img = img.mean(1, keepdim=True)
            out.append(((img + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()

    def checkpoint(self) -> str:
        if self._ckpt_id is None:
            from cca_ray.data.fingerprint import checkpoint_id

            self._ckpt_id = checkpoint_id(self.path)
        return self._ckpt_id

    def identity(self) -> dict:
        return {
            "family": self.kind,
            "version": VERSION,
            "codebook_size": self.codebook_size,
            "patch_size": self.model.cfg.downsample,
            "image_size": self.image_size,
            "channels": self.channels,
            "grid": list(self.grid),
            "code_shape": list(self.code_shape),
            "scales": list(self.scales),
            "fingerprint": self.checkpoint(),
        }

    def _meta(self) -> dict:
        return {"path": str(self.path), "quant_resi": self.model.quantize.quant_resi.qresi_ls[0].resi_ratio}

    @classmethod
    def load(cls, path: Path, meta: dict, device: str | None = None) -> "VARVQVAETokenizer":
        ident = meta["identity"]
        if ident.get("version") != VERSION:
            raise ValueError(f"{path}: VAR VQVAE tokenizer version {ident.get('version')!r}, this code reads {VERSION!r}")
        tok = cls(meta["path"], ident["image_size"], ident["channels"], ident["codebook_size"], ident["patch_size"],
                  device, patch_nums=ident.get("scales", PATCH_NUMS), quant_resi=meta.get("quant_resi"))
        if tok.checkpoint() != ident["fingerprint"]:
            raise ValueError(f"{meta['path']}: VQVAE weights changed since the data was tokenized "
                             f"({tok.checkpoint()} != {ident['fingerprint']}); re-run prepare")
        return tok
