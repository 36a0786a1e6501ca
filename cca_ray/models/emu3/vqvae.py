"""Emu3's VQ-VAE (transformers `Emu3VQVAE`) as an image tokenizer, loaded from a local path.

`tokenizer.path` is either a VQ-VAE checkpoint (config.json model_type "emu3_vqgan", as
`Emu3VQVAE.save_pretrained` writes) or a whole Emu3 checkpoint (model_type "emu3", e.g.
Emu3-Gen-hf), whose `vq_config` and `model.vqmodel.*` weights are used. A 720x720 image
becomes a 90x90 grid (spatial factor 8) of codes in [0, 32768).

Pixels are mapped to [-1, 1] (Emu3's image processor: mean 0.5, std 0.5); a 1-channel
image is repeated to RGB on the way in and averaged back on the way out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cca_ray.tokenizers.base import ImageTokenizer

VERSION = "emu3-vqvae/1"
_PREFIXES = ("model.vqmodel.", "vqmodel.")


def _load_vqvae(path: Path, dtype):
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: not found (tokenizer.path must be a local Emu3 or Emu3 VQ-VAE checkpoint)")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") == "emu3_vqgan":
        return Emu3VQVAE.from_pretrained(path, dtype=dtype).eval()
    if "vq_config" not in raw:
        raise ValueError(f"{cfg_file}: neither an Emu3 VQ-VAE (model_type emu3_vqgan) nor an Emu3 model with vq_config")
    from safetensors import safe_open

    model = Emu3VQVAE(Emu3VQVAEConfig(**raw["vq_config"]))
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                for pre in _PREFIXES:
                    if key.startswith(pre):
                        state[key[len(pre):]] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{path}: no VQ-VAE weights (keys starting with {' or '.join(_PREFIXES)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: VQ-VAE weights missing {len(missing)} tensors, e.g. {missing[:3]}")
    return model.to(dtype=dtype or torch.float32).eval()


class Emu3VQVAETokenizer(ImageTokenizer):
    kind = "emu3-vqvae"
    needs_fit = False

    def __init__(self, path: str | Path, image_size: int, channels: int, codebook_size: int | None = None,
                 patch_size: int | None = None, device: str | None = None, dtype: str = "float32"):
        import torch

        self.path = Path(path).expanduser().resolve()
        self.image_size, self.channels = image_size, channels
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = _load_vqvae(self.path, getattr(torch, dtype)).to(self.device)
        cfg = self.model.config
        factor = self.model.spatial_scale_factor
        # the config names the numbers the checkpoint fixes; a mismatch is a config error
        if codebook_size is not None and codebook_size != cfg.codebook_size:
            raise ValueError(f"tokenizer.codebook_size={codebook_size} but {self.path} has codebook_size {cfg.codebook_size}")
        if patch_size is not None and patch_size != factor:
            raise ValueError(f"tokenizer.patch_size={patch_size} but the VQ-VAE at {self.path} downsamples by {factor}")
        if image_size % factor:
            raise ValueError(f"data.image_size ({image_size}) must be a multiple of the VQ-VAE downsampling factor {factor}")
        self.codebook_size = int(cfg.codebook_size)
        self.grid = (image_size // factor, image_size // factor)
        self.in_channels, self.out_channels = int(cfg.in_channels), int(cfg.out_channels)
        self._ckpt_id: str | None = None

    @classmethod
    def from_config(cls, tok_cfg, image_size: int, channels: int, device: str | None = None) -> "Emu3VQVAETokenizer":
        if not tok_cfg.path:
            raise ValueError("tokenizer.kind=emu3-vqvae needs tokenizer.path (a local Emu3 or Emu3 VQ-VAE checkpoint)")
        return cls(tok_cfg.path, image_size, channels, tok_cfg.codebook_size, tok_cfg.patch_size, device)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> int32 [N, H/8, W/8]."""
        import torch

        images = self.check_images(images)
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[1] != self.in_channels:
            x = x.expand(-1, self.in_channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        sizes = torch.tensor([[self.image_size, self.image_size]] * len(x))
        with torch.inference_mode():
            out = self.model.encode(x.to(self.model.dtype), sizes)
        return torch.stack(list(out.image_tokens)).to(torch.int32).cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int [N, gh, gw] -> uint8 [N, H, W, C]."""
        import torch

        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != self.grid:
            raise ValueError(f"codes must be [N, {self.grid[0]}, {self.grid[1]}], got {list(codes.shape)}")
        with torch.inference_mode():
            img = self.model.decode(torch.as_tensor(codes, dtype=torch.long, device=self.device)).float()
        if img.shape[1] != self.channels:
            img = img.mean(1, keepdim=True) if self.channels == 1 else img.expand(-1, self.channels, -1, -1)
        img = ((img.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()

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
            "patch_size": self.model.spatial_scale_factor,
            "image_size": self.image_size,
            "channels": self.channels,
            "grid": list(self.grid),
            "fingerprint": self.checkpoint(),
        }

    def _meta(self) -> dict:
        return {"path": str(self.path)}

    @classmethod
    def load(cls, path: Path, meta: dict, device: str | None = None) -> "Emu3VQVAETokenizer":
        ident = meta["identity"]
        if ident.get("version") != VERSION:
            raise ValueError(f"{path}: Emu3 VQ-VAE tokenizer version {ident.get('version')!r}, this code reads {VERSION!r}")
        tok = cls(meta["path"], ident["image_size"], ident["channels"], ident["codebook_size"], ident["patch_size"], device)
        if tok.checkpoint() != ident["fingerprint"]:
            raise ValueError(f"{meta['path']}: VQ-VAE weights changed since the data was tokenized "
                             f"({tok.checkpoint()} != {ident['fingerprint']}); re-run prepare")
        return tok
