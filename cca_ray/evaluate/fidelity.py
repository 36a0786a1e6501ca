"""FID, IS, KID, precision/recall through torch-fidelity, plus condition accuracy.

Images are uint8 numpy arrays [N,H,W,C] (C=1 or 3). The convention is torch-fidelity's:
input1 = generated ("fake"), input2 = real reference. Reference features are computed once
per (reference images, extractor) and cached by torch-fidelity under the extractor's
cache_root; a ``ReferenceSet`` names that cache entry so Ray workers can score samples
without holding the real images.

Numbers are comparable only at equal n, same reference and same extractor (FID and KID
are biased in n): ``check_comparable`` enforces it, and every result dict carries those keys.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset

from cca_ray.evaluate.extractors import (
    Extractor,
    MnistCNN,
    as_uint8_images,
    single_threaded,
    to_nchw,
)

ALL_METRICS = ("fid", "isc", "kid", "prc")
# torch-fidelity result keys -> ours
_KEYS = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


class ImageArrayDataset(Dataset):
    """uint8 [N,H,W,C] numpy -> items uint8 [3,H,W] tensors (gray repeated to RGB), as torch-fidelity wants."""

    def __init__(self, images: np.ndarray, what: str = "images"):
        self.images = as_uint8_images(images, what)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = to_nchw(self.images[i : i + 1])[0]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


@dataclass(frozen=True)
class ReferenceSet:
    """A cached reference: torch-fidelity features/statistics stored as <cache_root>/<name>-<extractor>-*.pt.

    n: number of reference images; isc_mean: the Inception Score of the real images themselves
    (the ceiling a generator is read against)."""

    name: str
    extractor: str
    cache_root: Path
    n: int
    isc_mean: float

    def cache_files(self, ext: Extractor) -> list[Path]:
        layers = ext.feature_layers()
        files = [f"{self.name}-{self.extractor}-features-{layer}.pt" for layer in sorted(set(layers.values()))]
        files.append(f"{self.name}-{self.extractor}-stat-fid-{layers['fid']}.pt")
        return [self.cache_root / f for f in files]


def _base_kwargs(ext: Extractor, seed: int, batch_size: int) -> dict:
    return dict(
        **ext.fidelity_kwargs(),
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,  # no DataLoader worker processes: safe inside Ray actors
        verbose=False,
        batch_size=batch_size,
        rng_seed=seed,
        cache=True,
        cache_root=str(ext.cache_root),
    )


def _threads(ext: Extractor):
    # mnist-cnn's features and kernels are tiny: threads only add contention (see single_threaded).
    return single_threaded() if ext.kind == "mnist-cnn" else contextlib.nullcontext()


def reference_name(images: np.ndarray, dataset: str = "ref") -> str:
    """Content-addressed cache name: the same pixels always map to the same entry."""
    images = as_uint8_images(images, "reference images")
    h = hashlib.sha256(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)
    return f"{safe}-{h.hexdigest()[:12]}"


def prepare_reference(
    real_images: np.ndarray, extractor: Extractor, *, dataset: str = "ref", batch_size: int = 256
) -> ReferenceSet:
    """Extract and cache the reference features/statistics of real_images (uint8 [M,H,W,C]) once.

    One torch-fidelity call with input1 = input2 = the real set under one cache name writes the
    features of every layer the metrics read plus the FID statistics; later calls load them."""
    ds = ImageArrayDataset(real_images, "reference images")
    name = reference_name(ds.images, dataset)
    extractor.cache_root.mkdir(parents=True, exist_ok=True)
    with _threads(extractor):
        out = torch_fidelity.calculate_metrics(
            input1=ds, input1_cache_name=name, input2=ds, input2_cache_name=name,
            isc=True, fid=True, isc_splits=min(10, len(ds)), **_base_kwargs(extractor, 2020, batch_size),
        )  # fmt: skip
    return ReferenceSet(name, extractor.fidelity_name, extractor.cache_root, len(ds), float(out["inception_score_mean"]))


def compute_metrics(
    fake_images: np.ndarray,
    reference: ReferenceSet | np.ndarray,
    extractor: Extractor,
    *,
    kid_subset_size: int = 100,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    metrics: tuple[str, ...] = ALL_METRICS,
    labels: np.ndarray | None = None,
    seed: int = 2020,
    batch_size: int = 256,
) -> dict:
    """Score generated images (uint8 [N,H,W,C]) against a reference (a ReferenceSet, or real images).

    Returns a flat dict: fid, isc_mean, isc_std, kid_mean, kid_std, precision, recall, f_score (those
    asked for in ``metrics``), accuracy (when ``labels``, int [N], the conditions the samples were drawn
    for, are given and the extractor has a classifier head for them), and the comparability keys n, n_ref, reference, extractor, kid_subset_size.
    KID's subset size is clamped to min(N, n_ref) and the value used is reported.
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"metrics: unknown {sorted(unknown)}; choose from {ALL_METRICS}")
    fake = ImageArrayDataset(fake_images, "generated images")
    if not isinstance(reference, ReferenceSet):
        reference = prepare_reference(reference, extractor)
    if reference.extractor != extractor.fidelity_name:
        raise ValueError(f"reference {reference.name} was extracted with {reference.extractor}, not {extractor.fidelity_name}")
    missing = [str(p) for p in reference.cache_files(extractor) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"reference {reference.name}: cached features missing ({', '.join(missing)}); "
            "run prepare_reference(real_images, extractor) first"
        )
    n = len(fake)
    kid_subset_size = min(kid_subset_size, n, reference.n)
    kwargs = _base_kwargs(extractor, seed, batch_size)
    kwargs.update({m: m in metrics for m in ALL_METRICS}, cache_root=str(reference.cache_root))
    with _threads(extractor):
        raw = torch_fidelity.calculate_metrics(
            input1=fake,
            # Every feature input2 needs is cached under input2_cache_name, so torch-fidelity never reads
            # input2; it only has to be a dataset (None is refused for two-sample metrics).
            input2=ImageArrayDataset(np.zeros((1, 1, 1, 1), np.uint8)),
            input2_cache_name=reference.name,
            kid_subset_size=max(kid_subset_size, 2),
            prc_neighborhood=min(prc_neighborhood, n - 1, reference.n - 1),
            isc_splits=min(isc_splits, n),
            **kwargs,
        )
    out = {_KEYS[k]: float(v) for k, v in raw.items() if k in _KEYS}
    out.update(n=n, n_ref=reference.n, reference=reference.name, extractor=extractor.fidelity_name)
    if "kid" in metrics:
        out["kid_subset_size"] = kid_subset_size
    if labels is not None and extractor.num_classes is not None:  # only an extractor with a classifier head
        out["accuracy"] = condition_accuracy(fake.images, labels, extractor)
    return out


def fid_proxy(
    fake_images: np.ndarray, reference: ReferenceSet | np.ndarray, extractor: Extractor, *, num_samples: int,
    seed: int = 2020,
) -> dict:
    """The sweep's cheap FID: the same FID on exactly the first num_samples images (eval.proxy_num_samples).

    Returns {"fid_proxy", "n", "n_ref", "reference", "extractor"}; rank proxies only at equal n."""
    fake_images = as_uint8_images(fake_images, "generated images")
    if len(fake_images) < num_samples:
        raise ValueError(f"fid_proxy: need {num_samples} generated images (eval.proxy_num_samples), got {len(fake_images)}")
    out = compute_metrics(fake_images[:num_samples], reference, extractor, metrics=("fid",), seed=seed)
    out["fid_proxy"] = out.pop("fid")
    return out


def check_comparable(*results: dict) -> None:
    """Raise ValueError unless all metric dicts share n, reference and extractor (FID/KID depend on n)."""
    for key in ("n", "reference", "extractor"):
        seen = {r.get(key) for r in results}
        if len(seen) > 1:
            raise ValueError(f"metrics are not comparable: different {key} {sorted(map(str, seen))}")


@torch.no_grad()
def predict_labels(images: np.ndarray, classifier: Extractor | MnistCNN, batch_size: int = 512) -> np.ndarray:
    """Classifier's argmax class for uint8 [N,H,W,C] images -> int64 [N]."""
    images = as_uint8_images(images)
    net = classifier.classifier() if isinstance(classifier, Extractor) else classifier.eval()
    device = next(net.parameters()).device
    with single_threaded():
        preds = [net(to_nchw(images[i : i + batch_size]).to(device))[1].argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(preds).numpy()


def condition_accuracy(images: np.ndarray, labels: np.ndarray, classifier: Extractor | MnistCNN) -> float:
    """Condition adherence: fraction of samples (uint8 [N,H,W,C]) the classifier assigns to the label
    (int [N]) they were generated for. Chance is 1/num_classes."""
    images = as_uint8_images(images)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels: expected shape ({len(images)},) to match the images, got {labels.shape}")
    return float((predict_labels(images, classifier) == labels).mean())
