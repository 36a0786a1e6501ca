"""LlamaGen's VQ-16 as an ImageTokenizer (kind "llamagen-vq"), loaded from the released file.

`tokenizer.path` is the .pt file as released (vq_ds16_c2i.pt: weights under "model"; a bare
state dict loads too). A 256x256 image becomes a 16x16 grid of codes in [0, 16384); 384x384
becomes 24x24. Pixels map to [-1, 1] ((x / 255 - 0.5) / 0.5, LlamaGen's preprocessing) and back
as LlamaGen's sampler writes images (clamp(127.5 x + 128, 0, 255), truncated to uint8). A
1-channel image is repeated to RGB on the way in and averaged back on the way out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cca_ray.tokenizers.base import ImageTokenizer

VERSION = "llamagen-vq/1"


def load_vq(path: str | Path, dtype=None):
    """VQModel from a LlamaGen VQ .pt file; the architecture is read off the weights."""
    import torch

    from cca_ray.models.llamagen.checkpoint import (
        check_state_dict,
        materialise,
        read_state_dict,
    )
    from cca_ray.models.llamagen.vq import VQConfig, VQModel

    state, _ = read_state_dict(path)
    try:
        cfg = VQConfig.from_state_dict(state)
    except KeyError as e:
        raise ValueError(f"{path}: not a LlamaGen VQ checkpoint (no {e.args[0]})") from None
    with torch.device("meta"):
        model = VQModel(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if "quantize.codebook_used" not in state:  # a training statistic; files without it are fine
        state["quantize.codebook_used"] = torch.zeros(expected["quantize.codebook_used"])
    check_state_dict(state, expected, path, f"a LlamaGen VQ model with {cfg}")
    model.load_state_dict(materialise(state, "cpu", dtype or torch.float32), strict=True, assign=True)
    return model.eval()


class LlamaGenVQTokenizer(ImageTokenizer):
    kind = "llamagen-vq"
    needs_fit = False

    def __init__(self, path: str | Path, image_size: int, channels: int, codebook_size: int | None = None,
                 patch_size: int | None = None, device: str | None = None, dtype: str = "float32"):
        import torch

        self.path = Path(path).expanduser().resolve()
        self.image_size, self.channels = image_size, channels
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_vq(self.path, getattr(torch, dtype)).to(self.device)
        cfg = self.model.config
        # the config names numbers the checkpoint fixes; a mismatch is a config error, not a cast
        if codebook_size is not None and codebook_size != cfg.codebook_size:
            raise ValueError(f"tokenizer.codebook_size={codebook_size} but {self.path} has {cfg.codebook_size} codes")
        if patch_size is not None and patch_size != cfg.downsample:
            raise ValueError(f"tokenizer.patch_size={patch_size} but the VQ model at {self.path} downsamples by {cfg.downsample}")
        if image_size % cfg.downsample:
            raise ValueError(f"data.image_size ({image_size}) must be a multiple of the VQ downsampling factor {cfg.downsample}")
        self.codebook_size = cfg.codebook_size
        self.grid = (image_size // cfg.downsample,) * 2
        self._ckpt_id: str | None = None

    @classmethod
    def from_config(cls, tok_cfg, image_size: int, channels: int, device: str | None = None) -> LlamaGenVQTokenizer:
        if not tok_cfg.path:
            raise ValueError("tokenizer.kind=llamagen-vq needs tokenizer.path (a local vq_ds16_c2i.pt)")
        return cls(tok_cfg.path, image_size, channels, tok_cfg.codebook_size, tok_cfg.patch_size, device)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> int32 [N, H/16, W/16]."""
        import torch

        images = self.check_images(images)
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = (x - 0.5) / 0.5
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.inference_mode():
            codes = self.model.encode_codes(x.to(next(self.model.parameters()).dtype))
        return codes.to(torch.int32).cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int [N, gh, gw] -> uint8 [N, H, W, C]."""
        import torch

        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != self.grid:
            raise ValueError(f"codes must be [N, {self.grid[0]}, {self.grid[1]}], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{codes.min()}, {codes.max()}]")
        with torch.inference_mode():
            img = self.model.decode_codes(torch.as_tensor(codes, dtype=torch.long, device=self.device)).float()
        if self.channels == 1:
            img = img.mean(1, keepdim=True)
        img = torch.clamp(127.5 * img + 128.0, 0, 255).to(torch.uint8)  # truncation, as LlamaGen writes samples
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
            "patch_size": self.model.config.downsample,
            "image_size": self.image_size,
            "channels": self.channels,
            "grid": list(self.grid),
            "fingerprint": self.checkpoint(),
        }

    def _meta(self) -> dict:
        return {"path": str(self.path)}

    @classmethod
    def load(cls, path: Path, meta: dict, device: str | None = None) -> LlamaGenVQTokenizer:
        ident = meta["identity"]
        if ident.get("version") != VERSION:
            raise ValueError(f"{path}: LlamaGen VQ tokenizer version {ident.get('version')!r}, this code reads {VERSION!r}")
        tok = cls(meta["path"], ident["image_size"], ident["channels"], ident["codebook_size"], ident["patch_size"], device)
        if tok.checkpoint() != ident["fingerprint"]:
            raise ValueError(f"{meta['path']}: VQ weights changed since the data was tokenized "
                             f"({tok.checkpoint()} != {ident['fingerprint']}); re-run prepare")
        return tok


def build_tiny_vq(path: str | Path, *, codebook_size: int = 64, codebook_embed_dim: int = 8, ch: int = 32,
                  ch_mult: tuple[int, ...] = (1, 1, 1, 1, 1), num_res_blocks: int = 1, z_channels: int = 32,
                  seed: int = 0) -> Path:
    """A random-init VQ model in the released layout, saved as {"model": state_dict} at `path` (a .pt file)."""
    import torch

    from cca_ray.models.llamagen.vq import VQConfig, VQModel

    torch.manual_seed(seed)
    model = VQModel(VQConfig(codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim, ch=ch,
                             ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path
