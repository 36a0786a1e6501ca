"""What every image tokenizer offers (images <-> code grids) and how it is stored on disk.

A saved tokenizer is a directory holding `tokenizer.json` ({"kind", "identity", ...}) plus
whatever the kind needs (k-means: centroids.npy; Emu3 VQ-VAE: a pointer to the weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cca_ray.fs import write_json_atomic

META_FILE = "tokenizer.json"


class ImageTokenizer:
    """images uint8 [N, H, W, C] <-> codes int32 [N, *code_shape] in [0, codebook_size)."""

    kind: str = ""
    needs_fit: bool = False
    codebook_size: int
    grid: tuple[int, int]
    image_size: int
    channels: int

    @property
    def code_shape(self) -> tuple[int, ...]:
        """One image's codes: the grid for raster tokenizers; VAR's ten scales are (680,) flat."""
        return tuple(self.grid)

    def fit(self, images: np.ndarray) -> "ImageTokenizer":
        return self

    def encode(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def identity(self) -> dict:
        """What produced the codes: family, version, codebook_size, grid, and a fingerprint of
        the weights, so shards made by another tokenizer can be told apart."""
        raise NotImplementedError

    def _meta(self) -> dict:
        return {}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save_arrays(path)
        write_json_atomic(path / META_FILE, {"kind": self.kind, "identity": self.identity(), **self._meta()})
        return path

    def _save_arrays(self, path: Path) -> None:
        pass

    def check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        want = (self.image_size, self.image_size, self.channels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
            raise ValueError(f"{self.kind} tokenizer expects uint8 images [N, {want[0]}, {want[1]}, {want[2]}], "
                             f"got {images.dtype} {list(images.shape)}")
        return images


def read_meta(path: str | Path) -> dict:
    f = Path(path) / META_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f}: no saved tokenizer here (run python -m cca_ray.prepare first)")
    return json.loads(f.read_text())
