"""FID against precomputed reference statistics (ADM's ImageNet npz), with torch-fidelity's
inception-v3-compat from a local weights file: a random-weight Inception saved in torch-fidelity's
format here, and small npz files written by the tests. Accuracy without a classifier head is absent."""

import numpy as np
import pytest
import torch

from cca_ray.evaluate.extractors import INCEPTION_FILE, load_extractor
from cca_ray.evaluate.fidelity import compute_metrics
from cca_ray.evaluate.reference_stats import read_reference_stats, resize_images, stats_reference

N = 6  # Inception at 299 px on a CPU: keep the sets small


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's InceptionV3 (the FID network's layout, 566 tensors) with He-normal random weights,
    saved as the state dict its constructor torch.loads from feature_extractor_weights_path."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})  # construct without the released weights
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:  # the default init shrinks activations layer after layer
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
    path = tmp_path_factory.mktemp("torch_home") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ext(inception_file, tmp_path_factory):
    return load_extractor("inception-v3", tmp_path_factory.mktemp("extractors"), inception_weights=inception_file)


def images(seed, n=N, size=32):
    """Smooth random RGB images uint8 [n, size, size, 3] (blocks of 8 px: varied enough for Inception)."""
    base = np.random.default_rng(seed).integers(0, 256, (n, size // 8, size // 8, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, 8, 1), 8, 2)


def pool3(inception_file, imgs) -> np.ndarray:
    """The 2048-d features the npz statistics are of, straight from the network."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        (f,) = net(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
    return f.double().numpy()


def write_npz(path, feats, **extra):
    np.savez(path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), **extra)
    return path


def frechet_low_rank(fa: np.ndarray, fb_mu: np.ndarray, fb: np.ndarray) -> float:
    """FID of features fa [n, D] against (fb_mu, cov of fb [m, D]) without a D x D eigendecomposition:
    with S = X'X / (n - 1), the nonzero eigenvalues of Sa Sb are those of (Xa Xb')(Xb Xa') / ((n-1)(m-1))."""
    xa, xb = fa - fa.mean(0), fb - fb.mean(0)
    m = (xa @ xb.T) @ (xb @ xa.T) / ((len(fa) - 1) * (len(fb) - 1))
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(m).real, 0, None)).sum()
    d = fa.mean(0) - fb_mu
    return float(d @ d + (xa**2).sum() / (len(fa) - 1) + (xb**2).sum() / (len(fb) - 1) - 2 * tr_sqrt)


def test_fid_is_against_the_npz_statistics(tmp_path, ext, inception_file):
    """FID follows the Frechet distance to the file's mu/sigma (here: the real images' statistics with mu
    shifted), not to the images that serve KID and precision/recall. The one 2048-d FID of this file."""
    real, fake = images(1), images(2)
    feats = pool3(inception_file, real)
    shift = np.full(feats.shape[1], 0.01)
    npz = tmp_path / "shifted.npz"
    np.savez(npz, mu=feats.mean(0) + shift, sigma=np.cov(feats, rowvar=False))
    ref = stats_reference(npz, ext, fallback_images=real)
    assert ref.n == N and ref.name.startswith("npz-")
    got = compute_metrics(fake, ref, ext, metrics=("fid",))["fid"]
    fake_feats = pool3(inception_file, fake)
    want = frechet_low_rank(fake_feats, feats.mean(0) + shift, feats)
    assert want > frechet_low_rank(fake_feats, feats.mean(0), feats) + 2048 * 0.01**2 / 2  # the shift shows
    assert got == pytest.approx(want, rel=1e-3)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, ext, inception_file):
    """One real set's statistics twice: with the images inside the npz (arr_0, as ADM ships it) and without."""
    tmp = tmp_path_factory.mktemp("npz")
    real = images(3)
    feats = pool3(inception_file, real)

    def never():
        raise AssertionError("the npz has arr_0: the fallback images must not be read")

    inside = stats_reference(write_npz(tmp / "with_images.npz", feats, arr_0=real), ext, fallback_images=never)
    given = stats_reference(write_npz(tmp / "stats_only.npz", feats), ext, fallback_images=lambda: real)
    return inside, given


def test_images_inside_the_npz_are_the_reference_for_kid_and_prc(ext, refs):
    inside, given = refs
    assert inside.n == given.n == N and inside.name != given.name  # the file's digest is part of the name
    fake = images(4)
    a, b = (compute_metrics(fake, r, ext, kid_subset_size=4, metrics=("kid", "prc")) for r in (inside, given))
    for k in ("kid_mean", "precision", "recall"):  # the same reference images, by either route
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    assert a["n_ref"] == N and 0 <= a["precision"] <= 1


def test_inception_reports_no_accuracy_instead_of_crashing(ext, refs):
    out = compute_metrics(images(5), refs[1], ext, metrics=("isc",), labels=np.arange(N) % 10)
    assert "accuracy" not in out and np.isfinite(out["isc_mean"])


def test_missing_or_bad_npz_names_the_file(tmp_path, ext):
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz.*eval.reference_stats"):
        read_reference_stats(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(2048))
    with pytest.raises(ValueError, match=r"no_sigma.npz: no sigma"):
        read_reference_stats(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 4)))
    with pytest.raises(ValueError, match=r"shapes.npz: mu \(2048,\) and sigma \(2048, 4\)"):
        read_reference_stats(tmp_path / "shapes.npz")
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="64-d features"):
        stats_reference(tmp_path / "d64.npz", ext, fallback_images=images(1))
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="no reference images"):
        stats_reference(tmp_path / "stats_only.npz", ext)


def test_resize_is_bicubic_and_a_no_op_at_the_same_size():
    x = images(7, n=3, size=48)
    assert resize_images(x, None) is not None and resize_images(x, 48).shape == x.shape
    small = resize_images(x, 32)
    assert small.shape == (3, 32, 32, 3) and small.dtype == np.uint8
    flat = np.full((1, 48, 48, 3), 77, np.uint8)
    assert (resize_images(flat, 32) == 77).all()  # a constant image stays constant


def test_reference_stats_path_is_absolute_once_loaded(tmp_path, monkeypatch):
    from cca_ray.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("llamagen-l-a100", overrides=["eval.reference_stats=stats/ref.npz"])
    assert cfg.eval.reference_stats == str(tmp_path / "stats" / "ref.npz")
