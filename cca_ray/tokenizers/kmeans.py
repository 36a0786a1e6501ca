"""k-means patch vector quantiser: the demo's image tokenizer.

Each image is cut into non-overlapping p x p patches (p = tokenizer.patch_size); a patch is
a vector of p*p*C pixels in [0, 1]. k-means (k-means++ init, Lloyd iterations) on train
patches gives `codebook_size` centroids; a patch's code is its nearest centroid and
decoding pastes centroid patches back. Fits 5,000 MNIST digits in about a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cca_ray.tokenizers.base import ImageTokenizer

VERSION = "kmeans-patch-vq/2"  # 2: scikit-learn KMeans


def patchify(images: np.ndarray, p: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, H/p, W/p, p*p*C] in [0, 1]."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // p, w // p, p * p * c).astype(np.float32) / 255.0


def unpatchify(patches: np.ndarray, p: int, c: int) -> np.ndarray:
    """float [N, gh, gw, p*p*C] in [0, 1] -> uint8 [N, gh*p, gw*p, C]."""
    n, gh, gw, _ = patches.shape
    x = patches.reshape(n, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * p, gw * p, c)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index int32 [M] of each row of x [M, D]'s nearest centroid [K, D] (squared Euclidean)."""
    from sklearn.metrics import pairwise_distances_argmin

    return pairwise_distances_argmin(x, centroids).astype(np.int32)


def fit_kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """scikit-learn's k-means (k-means++ start, Lloyd iterations) on x [M, D] float32 -> centroids [k, D].

    One init and a fixed seed: the codebook is a pure function of (patches, k, iters, seed)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=iters, tol=1e-6, random_state=seed)
    return km.fit(x.astype(np.float32)).cluster_centers_.astype(np.float32)


class KMeansPatchTokenizer(ImageTokenizer):
    kind = "kmeans"
    needs_fit = True

    def __init__(self, codebook_size: int, patch_size: int, image_size: int, channels: int,
                 iters: int = 25, max_patches: int = 50_000, seed: int = 0, centroids: np.ndarray | None = None):
        if image_size % patch_size:
            raise ValueError(f"data.image_size ({image_size}) must be a multiple of tokenizer.patch_size ({patch_size})")
        self.codebook_size, self.patch_size = codebook_size, patch_size
        self.image_size, self.channels = image_size, channels
        self.iters, self.max_patches, self.seed = iters, max_patches, seed
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.centroids = centroids

    @classmethod
    def from_config(cls, tok_cfg, image_size: int, channels: int, **_) -> "KMeansPatchTokenizer":
        return cls(tok_cfg.codebook_size, tok_cfg.patch_size, image_size, channels,
                   tok_cfg.kmeans_iters, tok_cfg.kmeans_max_patches, tok_cfg.seed)

    def fit(self, images: np.ndarray, progress: bool = False) -> "KMeansPatchTokenizer":
        """Fit the codebook on train images uint8 [N, H, W, C] (at most max_patches patches)."""
        images = self.check_images(images)
        x = patchify(images, self.patch_size).reshape(-1, self.patch_size**2 * self.channels)
        if len(x) > self.max_patches:
            x = x[np.random.default_rng(self.seed).choice(len(x), self.max_patches, replace=False)]
        self.centroids = fit_kmeans(x, self.codebook_size, self.iters, self.seed)
        return self

    def _need_fit(self) -> np.ndarray:
        if self.centroids is None:
            raise RuntimeError("k-means tokenizer is not fitted: call fit(images) or load_tokenizer(dir)")
        return self.centroids

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> int32 [N, gh, gw]: the nearest centroid of each patch."""
        centroids = self._need_fit()
        patches = patchify(self.check_images(images), self.patch_size)
        n, gh, gw, d = patches.shape
        return nearest(patches.reshape(-1, d), centroids).reshape(n, gh, gw)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int [N, gh, gw] -> uint8 [N, H, W, C] built from centroid patches."""
        centroids = self._need_fit()
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != self.grid:
            raise ValueError(f"codes must be [N, {self.grid[0]}, {self.grid[1]}], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes outside the codebook [0, {self.codebook_size})")
        return unpatchify(centroids[codes], self.patch_size, self.channels)

    def identity(self) -> dict:
        centroids = self._need_fit()
        return {
            "family": self.kind,
            "version": VERSION,
            "codebook_size": self.codebook_size,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "channels": self.channels,
            "grid": list(self.grid),
            "fingerprint": hashlib.sha256(np.ascontiguousarray(centroids).tobytes()).hexdigest()[:16],
        }

    def _meta(self) -> dict:
        return {"iters": self.iters, "max_patches": self.max_patches, "seed": self.seed}

    def _save_arrays(self, path: Path) -> None:
        np.save(path / "centroids.npy", self._need_fit())

    @classmethod
    def load(cls, path: Path, meta: dict, **_) -> "KMeansPatchTokenizer":
        ident = meta["identity"]
        if ident.get("version") != VERSION:
            raise ValueError(f"{path}: k-means tokenizer version {ident.get('version')!r}, this code reads {VERSION!r}")
        tok = cls(ident["codebook_size"], ident["patch_size"], ident["image_size"], ident["channels"],
                  meta.get("iters", 25), meta.get("max_patches", 50_000), meta.get("seed", 0),
                  np.load(path / "centroids.npy").astype(np.float32))
        if tok.identity()["fingerprint"] != ident["fingerprint"]:
            raise ValueError(f"{path}/centroids.npy does not match the fingerprint in tokenizer.json")
        return tok
