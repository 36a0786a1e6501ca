"""VAR's multi-scale VQVAE as an image tokenizer (kind ``var-vqvae``).

An image (uint8 [256, 256, 3]) becomes ten index maps (1x1 ... 16x16), stored flat as
int32 [680] in VAR's order; decoding rebuilds f_hat from all ten and runs the decoder.
``tokenizer.path`` is the VQVAE file (``vae_ch160v4096z32.pth`` or one in that format). Without a
path, prepare fits a tiny VQVAE in that format on the train images (fit_vqvae.py: the smoke run's
tokenizer, downsampling by tokenizer.patch_size, VAR's scales up to image_size / patch_size) and
saves it inside the tokenizer directory as ``vae_tiny.pth``.
The identity carries the scale layout (``grid`` = the last scale, ``code_shape`` = [680],
``scales``), so shards made with it say how to split their codes.

Pixels map to [-1, 1] as VAR's data pipeline does; a 1-channel image is repeated to RGB on
the way in and averaged back on the way out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cca_ray.models.var.layout import PATCH_NUMS, ScaleLayout
from cca_ray.models.var.vqvae import load_vqvae
from cca_ray.tokenizers.base import ImageTokenizer

VERSION = "var-vqvae/1"
FITTED_FILE = "vae_tiny.pth"  # a VQVAE fitted by prepare, inside the tokenizer directory


class VARVQVAETokenizer(ImageTokenizer):
    kind = "var-vqvae"
    needs_fit = False

    def __init__(self, path: str | Path | None, image_size: int = 256, channels: int = 3,
                 codebook_size: int | None = None, patch_size: int | None = None, device: str | None = None,
                 patch_nums=None, quant_resi: float | None = None, batch_size: int = 16, seed: int = 0):
        self.image_size, self.channels, self.batch_size, self.seed = image_size, channels, batch_size, seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if channels not in (1, 3):
            raise ValueError(f"var-vqvae tokenizer takes 1- or 3-channel images, got {channels}")
        self._ckpt_id: str | None = None
        if path is None:  # fitted by prepare (fit()): the config fixes every number
            from cca_ray.models.var.fit_vqvae import tiny_patch_nums

            if not patch_size or image_size % patch_size:
                raise ValueError(f"tokenizer.kind=var-vqvae without tokenizer.path fits a tiny VQVAE: "
                                 f"data.image_size ({image_size}) must be a multiple of tokenizer.patch_size "
                                 f"({patch_size})")
            self.needs_fit = True
            self.path, self.model, self.fit_downsample = None, None, patch_size
            self.codebook_size = codebook_size
            self.layout = ScaleLayout(tuple(patch_nums or tiny_patch_nums(image_size // patch_size)))
            self.grid, self.scales = self.layout.grid, self.layout.patch_nums
            return
        self.path = Path(path).expanduser().resolve()
        self._open(patch_nums, quant_resi, codebook_size, patch_size)

    def _open(self, patch_nums, quant_resi, codebook_size=None, patch_size=None) -> None:
        self.model = load_vqvae(self.path, patch_nums=patch_nums, quant_resi=quant_resi, device=self.device)
        cfg = self.model.cfg
        layout = self.model.quantize.layout
        image_size = self.image_size
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
        self.needs_fit = False
        self.layout = layout
        self.codebook_size = cfg.vocab_size
        self.grid = layout.grid
        self.scales = layout.patch_nums

    def fit(self, images: np.ndarray, progress: bool = False) -> "VARVQVAETokenizer":
        """Fit the tiny VQVAE on train images uint8 [N, H, W, C] (only without tokenizer.path)."""
        if not self.needs_fit:
            return self
        import tempfile

        from cca_ray.models.var.fit_vqvae import fit_tiny_vqvae

        images = self.check_images(images)
        self._fit_dir = tempfile.mkdtemp(prefix="var-vqvae-")  # until save() puts it in the tokenizer dir
        self.path = fit_tiny_vqvae(images, Path(self._fit_dir) / FITTED_FILE, vocab_size=self.codebook_size,
                                   patch_nums=self.scales, downsample=self.fit_downsample, seed=self.seed,
                                   progress=progress).resolve()
        self._open(self.scales, None)
        return self

    def _save_arrays(self, path: Path) -> None:
        if self.path is None:
            raise ValueError("var-vqvae tokenizer without tokenizer.path: fit() it before save()")
        if self.path.name == FITTED_FILE and self.path.parent != path:  # a fitted VQVAE lives in the tokenizer dir
            import shutil

            shutil.copy2(self.path, path / FITTED_FILE)

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.layout.num_tokens,)

    @classmethod
    def from_config(cls, tok_cfg, image_size: int, channels: int, device: str | None = None) -> "VARVQVAETokenizer":
        # no path: prepare fits a tiny one (the smoke run); a released VQVAE file fixes the numbers itself
        return cls(tok_cfg.path, image_size, channels, tok_cfg.codebook_size, tok_cfg.patch_size, device,
                   seed=tok_cfg.seed)

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
        # a fitted VQVAE is named relative to the tokenizer dir (which prepare writes elsewhere, then moves)
        where = FITTED_FILE if self.path.name == FITTED_FILE else str(self.path)
        return {"path": where, "quant_resi": self.model.quantize.quant_resi.qresi_ls[0].resi_ratio}

    @classmethod
    def load(cls, path: Path, meta: dict, device: str | None = None) -> "VARVQVAETokenizer":
        ident = meta["identity"]
        if ident.get("version") != VERSION:
            raise ValueError(f"{path}: VAR VQVAE tokenizer version {ident.get('version')!r}, this code reads {VERSION!r}")
        vae = meta["path"] if Path(meta["path"]).is_absolute() else Path(path) / meta["path"]
        tok = cls(vae, ident["image_size"], ident["channels"], ident["codebook_size"], ident["patch_size"],
                  device, patch_nums=ident.get("scales", PATCH_NUMS), quant_resi=meta.get("quant_resi"))
        if tok.checkpoint() != ident["fingerprint"]:
            raise ValueError(f"{vae}: VQVAE weights changed since the data was tokenized "
                             f"({tok.checkpoint()} != {ident['fingerprint']}); re-run prepare")
        return tok
