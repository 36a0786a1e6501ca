"""FID against precomputed reference statistics: the standard ImageNet numbers (LlamaGen, VAR, CCA).

Those papers score 50,000 samples, resized to 256x256, against ADM's reference batch
``VIRTUAL_imagenet256_labeled.npz``: ``mu`` float64 [2048] and ``sigma`` float64 [2048, 2048], the mean
and covariance of Inception pool3 features of the ImageNet training set, plus (in ADM's file) the
reference images themselves as ``arr_0`` uint8 [10000, 256, 256, 3]. Here the same pool3 features
come from torch-fidelity's ``inception-v3-compat`` (eval.extractor inception-v3, weights from a local
file), so the npz's statistics stand in for the real images' in FID:

    ref = stats_reference("VIRTUAL_imagenet256_labeled.npz", extractor, fallback_images=holdout)
    compute_metrics(samples, ref, extractor)      # cca_ray.evaluate.fidelity, unchanged

`stats_reference` writes the npz's mu/sigma as torch-fidelity's FID statistics cache entry of a
reference name, and the features of the reference *images* (``arr_0``, else `fallback_images`) under
the same name: FID then reads the npz's statistics, KID and precision/recall the images' features, IS
needs only the samples. The name hashes the statistics and the images, so a different file never
reuses a stale entry. No Ray here; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from cca_ray.evaluate.extractors import Extractor, as_uint8_images
from cca_ray.evaluate.fidelity import ImageArrayDataset, ReferenceSet, _base_kwargs, _threads, reference_name

ADM_FILE = "VIRTUAL_imagenet256_labeled.npz"


def read_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D, D]) from an npz with `mu` and `sigma`; ValueError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics not found at {path} (eval.reference_stats). This machine cannot download them: "
            f"copy ADM's {ADM_FILE} (github.com/openai/guided-diffusion, evaluations/) there, or point "
            "eval.reference_stats at an npz holding Inception 'mu' and 'sigma'")
    with np.load(path) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: no {' or '.join(missing)} array (has {', '.join(z.files) or 'nothing'}); "
                             "reference statistics need Inception feature 'mu' [D] and 'sigma' [D, D]")
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} must be [D] and [D, D]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma hold NaN or inf")
    return mu, sigma


def read_reference_images(path: str | Path) -> np.ndarray | None:
    """The npz's reference images (`arr_0`, uint8 [M, H, W, 3]) or None when it has none."""
    with np.load(Path(path).expanduser()) as z:
        return as_uint8_images(z["arr_0"], f"{path}: arr_0") if "arr_0" in z.files else None


def _fid_layer(extractor: Extractor) -> str:
    return extractor.feature_layers()["fid"]


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stats_reference(path: str | Path, extractor: Extractor, *,
                    fallback_images: np.ndarray | Callable[[], np.ndarray] | None = None,
                    batch_size: int = 256) -> ReferenceSet:
    """A ReferenceSet whose FID statistics are the npz's mu/sigma and whose images (for KID, precision,
    recall and the reference IS) are the npz's arr_0, else `fallback_images` (uint8 [M, H, W, C], or a
    function returning them: called only when the npz has no images)."""
    mu, sigma = read_reference_stats(path)
    layer = _fid_layer(extractor)
    if layer.isdigit() and int(layer) != mu.shape[0]:  # Inception's layers are named by their width
        raise ValueError(f"{path}: statistics of {mu.shape[0]}-d features, extractor {extractor.kind} reads its "
                         f"{layer}-d layer")
    images = read_reference_images(path)
    if images is None:
        if fallback_images is None:
            raise ValueError(f"{path}: has no reference images (arr_0) and none were given: KID and "
                             "precision/recall need real images' features")
        images = as_uint8_images(fallback_images() if callable(fallback_images) else fallback_images,
                                 "reference images")
    ds = ImageArrayDataset(images, "reference images")
    h = hashlib.sha256(mu.tobytes())
    h.update(sigma.tobytes())
    name = f"npz-{reference_name(ds.images, Path(path).stem)}-{h.hexdigest()[:12]}"
    stat_file = extractor.cache_root / f"{name}-{extractor.fidelity_name}-stat-fid-{layer}.pt"
    extractor.cache_root.mkdir(parents=True, exist_ok=True)
    # torch-fidelity's own statistics entry: mu in the features' dtype (float32), sigma as np.cov gives it
    # (float64); its FID asserts both sides agree in dtype
    _atomic_torch_save({"mu": mu.astype(np.float32), "sigma": sigma}, stat_file)
    # one pass caches the features of every layer the metrics read; KID (not FID) asks for the pool3 layer:
    # the FID of a set against itself would cost a 2048x2048 eigendecomposition for nothing
    with _threads(extractor):
        out = torch_fidelity.calculate_metrics(
            input1=ds, input1_cache_name=name, input2=ds, input2_cache_name=name, isc=True, kid=True,
            isc_splits=min(10, len(ds)), kid_subset_size=max(2, min(100, len(ds))),
            **_base_kwargs(extractor, 2020, batch_size),
        )  # fmt: skip
    # the features' width must be the statistics': a 64-d mnist-cnn against 2048-d Inception stats is an error
    feats = torch.load(extractor.cache_root / f"{name}-{extractor.fidelity_name}-features-{layer}.pt",
                       map_location="cpu", weights_only=False)
    if feats.shape[1] != mu.shape[0]:
        stat_file.unlink()
        raise ValueError(f"{path}: statistics of {mu.shape[0]}-d features, but extractor {extractor.kind} "
                         f"gives {feats.shape[1]}-d '{layer}' features; use eval.extractor=inception-v3")
    return ReferenceSet(name, extractor.fidelity_name, extractor.cache_root, len(ds), float(out["inception_score_mean"]))


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, size, size, C], bicubic (LlamaGen's --image-size-eval: its samples are
    resized with F.interpolate(mode="bicubic") before FID); the images as they are when size is None or equal."""
    images = as_uint8_images(images)
    if size is None or images.shape[1:3] == (size, size):
        return images
    out = []
    for i in range(0, len(images), 256):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + 256])).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)
