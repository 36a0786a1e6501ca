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

VERSION = "kmeans-patch-vq/1"


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


def nearest(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Index [M] (int32) and squared distance [M] of each row of x [M, D] to its nearest centroid [K, D]."""
    c2 = (centroids**2).sum(1)
    idx = np.empty(len(x), dtype=np.int32)
    dist = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin
        d = c2[None, :] - 2.0 * xs @ centroids.T
        idx[s : s + chunk] = d.argmin(1)
        dist[s : s + chunk] = np.maximum(d[np.arange(len(xs)), idx[s : s + chunk]] + (xs**2).sum(1), 0.0)
    return idx, dist


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centroid drawn with probability ~ squared distance. -> [k, D]"""
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(len(x))]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        # fewer distinct patches than k: repeat points rather than divide by zero
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centroids[j] = x[i]
        d2 = np.minimum(d2, ((x - centroids[j]) ** 2).sum(1))
    return centroids


def fit_kmeans(x: np.ndarray, k: int, iters: int, seed: int, progress: bool = False) -> np.ndarray:
    """Lloyd's k-means on x [M, D] (float32) from a k-means++ start. -> centroids [k, D]."""
    rng = np.random.default_rng(seed)
    centroids = kmeans_pp_init(x, k, rng)
    steps = range(iters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="k-means", unit="iter", leave=False)
    for _ in steps:
        idx, dist = nearest(x, centroids)
        counts = np.bincount(idx, minlength=k)
        # per-dimension bincount: ~50x faster than np.add.at for scatter-sums
        sums = np.stack([np.bincount(idx, weights=x[:, j], minlength=k) for j in range(x.shape[1])], axis=1)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
        # an empty cluster takes the worst-fitted points so no code is wasted
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            new[empty] = x[np.argsort(dist)[::-1][: len(empty)]]
        if np.allclose(new, centroids, atol=1e-6):
            centroids = new
            break
        centroids = new
    return centroids.astype(np.float32)


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
        self.centroids = fit_kmeans(x, self.codebook_size, self.iters, self.seed, progress)
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
        return nearest(patches.reshape(-1, d), centroids)[0].reshape(n, gh, gw)

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
