"""Image tokenizers: k-means patch VQ round trip and persistence; Emu3 VQ-VAE through transformers."""

import json

import numpy as np
import pytest

from cca_ray.config import load_config
from cca_ray.data.sources import iter_rows, make_source
from cca_ray.tokenizers import TOKENIZERS, build_tokenizer, load_tokenizer
from cca_ray.models.emu3.vqvae import Emu3VQVAETokenizer
from cca_ray.tokenizers.kmeans import KMeansPatchTokenizer, patchify, unpatchify


@pytest.fixture(scope="module")
def smoke_images():
    cfg = load_config("smoke")
    return cfg, np.stack([r.image for r in iter_rows(make_source(cfg.data))])


@pytest.fixture(scope="module")
def fitted(smoke_images):
    cfg, images = smoke_images
    return build_tokenizer(cfg.tokenizer, cfg.data.image_size, cfg.data.channels).fit(images)


def test_registry_matches_config_choices():
    from typing import get_args

    from cca_ray.config import TokenizerConfig

    assert set(TOKENIZERS) == set(get_args(TokenizerConfig.model_fields["kind"].annotation))


def test_patchify_round_trip_is_exact():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 8, 12, 3), dtype=np.uint8)
    p = patchify(x, 4)
    assert p.shape == (3, 2, 3, 4 * 4 * 3)
    assert np.array_equal(unpatchify(p, 4, 3), x)


def test_kmeans_round_trip_error_bound(smoke_images, fitted):
    """Reconstruction must beat the best constant image by a wide margin (and stay under an
    absolute bound): on 8x8 digits, 32 codes of 2x2 patches give a mean abs error of about
    15/255 against about 85/255 for the mean pixel value."""
    cfg, images = smoke_images
    codes = fitted.encode(images)
    assert codes.shape == (len(images), 4, 4) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < cfg.tokenizer.codebook_size
    recon = fitted.decode(codes)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    mae = np.abs(recon.astype(np.float64) - images).mean()
    baseline = np.abs(images - images.mean()).mean()
    assert mae < 25.0, mae
    assert mae < 0.35 * baseline, (mae, baseline)
    # decoding is a fixed point: re-encoding decoded images gives the same codes
    assert np.array_equal(fitted.encode(recon), codes)


def test_kmeans_fit_is_deterministic_and_uses_the_codebook(smoke_images, fitted):
    cfg, images = smoke_images
    again = build_tokenizer(cfg.tokenizer, cfg.data.image_size, cfg.data.channels).fit(images)
    assert again.identity() == fitted.identity()
    used = np.unique(fitted.encode(images))
    assert len(used) == cfg.tokenizer.codebook_size  # no dead codes on the data it was fit on


def test_kmeans_save_load_identity(tmp_path, smoke_images, fitted):
    _, images = smoke_images
    fitted.save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, KMeansPatchTokenizer)
    ident = tok.identity()
    assert ident == fitted.identity()
    assert ident["version"] == "kmeans-patch-vq/2" and ident["family"] == "kmeans"
    assert ident["grid"] == [4, 4] and ident["codebook_size"] == 32
    assert np.array_equal(tok.encode(images[:20]), fitted.encode(images[:20]))


def test_kmeans_load_refuses_other_version_and_tampered_weights(tmp_path, fitted):
    d = fitted.save(tmp_path / "tok")
    meta = json.loads((d / "tokenizer.json").read_text())
    meta["identity"]["version"] = "kmeans-patch-vq/0"
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version"):
        load_tokenizer(d)
    d = fitted.save(tmp_path / "tok2")
    np.save(d / "centroids.npy", np.load(d / "centroids.npy") + 0.01)
    with pytest.raises(ValueError, match="fingerprint"):
        load_tokenizer(d)


def test_kmeans_rejects_bad_inputs(fitted):
    with pytest.raises(ValueError, match=r"uint8 images \[N, 8, 8, 1\]"):
        fitted.encode(np.zeros((2, 9, 9, 1), np.uint8))
    with pytest.raises(ValueError, match="outside the codebook"):
        fitted.decode(np.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="multiple of tokenizer.patch_size"):
        KMeansPatchTokenizer(16, 3, 8, 1)


# -- Emu3 VQ-VAE ----------------------------------------------------------------------------
def _tiny_vqvae(path, codebook_size=64):
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    cfg = Emu3VQVAEConfig(codebook_size=codebook_size, embed_dim=4, latent_channels=4, base_channels=32,
                          channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32)
    Emu3VQVAE(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return _tiny_vqvae(tmp_path_factory.mktemp("vq") / "emu3-vq")


def test_emu3_vqvae_encode_decode_shapes(tmp_path, vq_dir):
    cfg = load_config("smoke", overrides={"tokenizer.kind": "emu3-vqvae", "tokenizer.path": str(vq_dir),
                                          "tokenizer.codebook_size": 64, "tokenizer.patch_size": 8})
    tok = build_tokenizer(cfg.tokenizer, image_size=32, channels=1)
    assert isinstance(tok, Emu3VQVAETokenizer) and tok.grid == (4, 4) and tok.codebook_size == 64
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 1), dtype=np.uint8)
    codes = tok.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 64
    assert np.array_equal(tok.encode(images), codes)  # frozen, eval mode: deterministic
    recon = tok.decode(codes)
    assert recon.shape == (3, 32, 32, 1) and recon.dtype == np.uint8
    # save -> load gives the same tokenizer, identified by the checkpoint's content hash
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.identity() == tok.identity() and tok.identity()["fingerprint"].startswith("sha256:")
    assert np.array_equal(again.encode(images), codes)


def test_emu3_vqvae_config_mismatch_is_named(vq_dir):
    with pytest.raises(ValueError, match="tokenizer.codebook_size=128"):
        Emu3VQVAETokenizer(vq_dir, 32, 1, codebook_size=128)
    with pytest.raises(ValueError, match="tokenizer.patch_size=4"):
        Emu3VQVAETokenizer(vq_dir, 32, 1, patch_size=4)
    with pytest.raises(ValueError, match=r"data.image_size \(28\)"):
        Emu3VQVAETokenizer(vq_dir, 28, 1)


def test_emu3_vqvae_load_refuses_changed_weights(tmp_path):
    vq = _tiny_vqvae(tmp_path / "vq")
    tok = Emu3VQVAETokenizer(vq, 16, 3)
    tok.save(tmp_path / "tok")
    import torch
    from transformers import Emu3VQVAE

    m = Emu3VQVAE.from_pretrained(vq)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    m.save_pretrained(vq)
    with pytest.raises(ValueError, match="changed since the data was tokenized"):
        load_tokenizer(tmp_path / "tok")


def test_emu3_vqvae_from_whole_emu3_checkpoint(tmp_path):
    """tokenizer.path may point at a full Emu3 checkpoint: its vq_config and model.vqmodel.* weights are used."""
    from cca_ray.models import build_tiny_model

    cfg = load_config("smoke")
    model_dir = build_tiny_model(tmp_path / "emu3", cfg.model, codebook_size=32, prompts=["a handwritten digit one"])
    tok = Emu3VQVAETokenizer(model_dir, 16, 3, codebook_size=32)
    codes = tok.encode(np.zeros((2, 16, 16, 3), np.uint8))
    assert codes.shape == (2, 2, 2) and codes.max() < 32
