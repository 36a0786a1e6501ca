"""VAR through the stages: the model.var options block and loader options, the tiny VQVAE prepare fits,
the registry's tiny VAR over the data's tokenizer, drop-path from per-row seeds (Δ = 0 at step 0 with
drop-path on, against the online and the precomputed reference), the trainer on VAR's flat multi-scale
codes, and the main job end to end on the var-smoke preset (a real local Ray cluster, DeepSpeed, MLflow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cca_ray.config import ConfigError, load_config
from cca_ray.models import build_tiny_model, load_model, loader_options
from cca_ray.models.var import build_tiny_var, build_tiny_vqvae

ROOT = Path(__file__).resolve().parents[1]
K, CLASSES, SCALES = 32, 10, (1, 2, 3, 4)  # the var-smoke data: 32 codes, digits 0..9, 30 codes per image
L = sum(p * p for p in SCALES)


def digits(n=128):
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:n] / 16 * 255).astype(np.uint8)[..., None], d.target[:n]


@pytest.fixture(scope="module")
def fitted_tokenizer(tmp_path_factory):
    """The var-smoke tokenizer as prepare makes it: fitted on digits, saved, loaded back."""
    from cca_ray.tokenizers import build_tokenizer, load_tokenizer

    cfg = load_config("var-smoke")
    tok = build_tokenizer(cfg.tokenizer, cfg.data.image_size, cfg.data.channels, device="cpu")
    assert tok.needs_fit and tok.scales == SCALES and tok.code_shape == (L,)
    images, _ = digits(256)
    tok.fit(images)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok.save(out)
    return load_tokenizer(out, device="cpu"), out


# -- config -> loader options -----------------------------------------------------------
def test_var_options_block_and_released_file_checks(tmp_path):
    with pytest.raises(ConfigError, match="model.var.depth and model.var.vae_path"):
        load_config("var-smoke", overrides=[f"model.path={tmp_path / 'var_d16.pth'}"])
    with pytest.raises(ConfigError, match="model.var.depth is set but model.family is emu3"):
        load_config("smoke", overrides=["model.var.depth=16"])
    with pytest.raises(ConfigError, match="model.var.depth"):
        load_config("var-smoke", overrides=["model.var.depth=17"])
    cfg = load_config("var-smoke", overrides=[f"model.path={tmp_path / 'var_d16.pth'}", "model.var.depth=16",
                                              "model.var.vae_path=vae.pth", "model.var.drop_path_rate=0.05"])
    assert cfg.model.var.vae_path == str(Path("vae.pth").resolve())  # a path field: absolute at load
    assert loader_options(cfg.model, cfg.model.path) == {"family": "var", "depth": 16, "vae_path": cfg.model.var.vae_path,
                                                         "drop_path_rate": 0.05}
    assert load_config("var-smoke").sample.cfg_schedule == "linear"


def test_loader_options_load_a_bare_released_file(tmp_path):
    built = build_tiny_var(tmp_path / "built", codebook_size=K, num_classes=CLASSES, patch_nums=SCALES)
    sd = torch.load(built / "var_d2.pth", weights_only=True)
    torch.save(sd, tmp_path / "var_d2.pth")
    cfg = load_config("var-smoke", overrides=[f"model.path={tmp_path / 'var_d2.pth'}", "model.var.depth=16",
                                              f"model.var.vae_path={built / 'vae_tiny.pth'}",
                                              f"model.var.patch_nums={list(SCALES)}"])
    with pytest.raises(ValueError, match="holds a VAR-d2, but depth=16"):
        load_model(cfg.model.path, **loader_options(cfg.model, cfg.model.path))
    opts = {**loader_options(cfg.model, cfg.model.path), "depth": 2}
    m = load_model(cfg.model.path, **opts)
    assert m.code_shape == (L,) and m.layout.patch_nums == SCALES


# -- the tiny VQVAE prepare fits, and the tiny VAR over it ----------------------------------
def test_fitted_vqvae_reconstructs_digits_and_round_trips(fitted_tokenizer):
    tok, out = fitted_tokenizer
    images, _ = digits(64)
    codes = tok.encode(images)
    assert codes.shape == (64, L) and codes.dtype == np.int32
    rec = tok.decode(codes).astype(np.float32)
    err = np.mean((rec - images) ** 2) / np.var(images.astype(np.float32))
    assert err < 0.25, err  # a random VQVAE decodes noise (relative error ~1); the fitted one recognisable digits
    assert len(np.unique(codes)) > K // 2  # most of the codebook in use
    ident = json.loads((out / "tokenizer.json").read_text())
    assert ident["path"] == "vae_tiny.pth" and ident["identity"]["scales"] == list(SCALES)
    np.testing.assert_array_equal(tok.encode(tok.decode(codes)), tok.encode(tok.decode(codes)))


def test_registry_builds_a_tiny_var_over_the_data_tokenizer(fitted_tokenizer, tmp_path):
    tok, out = fitted_tokenizer
    cfg = load_config("var-smoke")
    d = build_tiny_model(tmp_path / "m", cfg.model, codebook_size=K, num_classes=CLASSES, grid=(4, 4),
                         tokenizer_dir=out)
    m = load_model(d)
    assert (m.family, m.code_shape, m.codebook_size, m.num_classes) == ("var", (L,), K, CLASSES)
    images, labels = digits(8)
    codes = torch.from_numpy(tok.encode(images)).long()
    cond = m.encode_conditions(labels.tolist())
    assert torch.isfinite(m.sequence_logprob(cond, codes)).all()
    assert tok.decode(m.generate(cond, seed=0).numpy()).shape == images.shape
    with pytest.raises(ValueError, match="var-vqvae"):
        from cca_ray.tokenizers.kmeans import KMeansPatchTokenizer

        km = KMeansPatchTokenizer(K, 2, 8, 1).fit(images)
        km.save(tmp_path / "km")
        build_tiny_model(tmp_path / "m2", cfg.model, codebook_size=K, num_classes=CLASSES, tokenizer_dir=tmp_path / "km")


# -- drop-path from per-row seeds ------------------------------------------------------------
@pytest.fixture(scope="module")
def dropping_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    vae = build_tiny_vqvae(d / "vae.pth", vocab_size=K, patch_nums=SCALES, ch_mult=(1, 1, 2))
    return build_tiny_var(d / "m", codebook_size=K, num_classes=CLASSES, num_layers=4, vae_path=vae,
                          patch_nums=SCALES, drop_path_rate=0.5)


def test_drop_path_from_row_seeds_is_shared_and_only_seeds_decide(dropping_dir):
    from cca_ray.train.batches import row_seeds

    policy, ref = load_model(dropping_dir), load_model(dropping_dir)
    policy.module.train()  # the policy trains; the frozen reference stays in eval mode
    codes = torch.randint(0, K, (16, L), generator=torch.Generator().manual_seed(0))
    cond = policy.encode_conditions(list(range(10)) + list(range(6)))
    seeds = torch.from_numpy(row_seeds([f"digits:{i}" for i in range(16)]))
    with torch.no_grad():
        lp = policy.sequence_logprob(cond, codes, drop_seeds=seeds)
        assert torch.equal(lp, ref.sequence_logprob(cond, codes, drop_seeds=seeds))  # Δ = 0 exactly
        assert torch.equal(lp, policy.sequence_logprob(cond, codes, drop_seeds=seeds))  # no global RNG
        plain = ref.sequence_logprob(cond, codes)  # eval, no seeds: no drop-path
        other = policy.sequence_logprob(cond, codes, drop_seeds=seeds + 1)
        free = policy.sequence_logprob(cond, codes)  # train mode, no seeds: the global generator
    assert (lp != plain).any() and (lp != other).any() and (free != plain).any()
    # each row's draws are its own: scoring a row alone gives its value in the batch
    with torch.no_grad():
        one = policy.sequence_logprob(policy.encode_conditions([3]), codes[3:4], drop_seeds=seeds[3:4])
    torch.testing.assert_close(one, lp[3:4], rtol=1e-5, atol=1e-4)


def _pairs(n=32, seed=0, codes=None):
    from cca_ray.train.batches import TrainRows, row_seeds

    rng = np.random.default_rng(seed)
    lab = rng.integers(0, CLASSES, n)
    neg = (lab + rng.integers(1, CLASSES, n)) % CLASSES
    codes = rng.integers(0, K, (n, L)).astype(np.int32) if codes is None else codes
    return TrainRows(codes=codes, cond=lab.tolist(), neg_cond=neg.tolist(), pos_null=rng.random(n) < 0.25,
                     neg_null=rng.random(n) < 0.25, source="synthetic", manifest={"grid": [4, 4]},
                     row_seeds=row_seeds([f"synthetic:{i}" for i in range(n)]))


@pytest.mark.parametrize("objective", ["cca", "cca_cfg"])
def test_step_zero_delta_is_zero_with_drop_path_online_and_precomputed(process_group, dropping_dir, objective):
    """With drop-path 0.5 on, the policy (train mode) and the frozen reference score every pair alike at
    step 0, and so does the precomputed reference pass's scorer (ReferenceScorer, seeds from source_id)."""
    import pyarrow as pa

    from cca_ray.train.batches import make_micro_batch
    from cca_ray.train.recipe import Trainer
    from cca_ray.train.reference import ReferenceScorer

    cfg = load_config("var-smoke", overrides=[f"train.objective={objective}", "train.max_steps=1",
                                              "train.micro_batch_size=8"])
    data = _pairs()
    tr = Trainer(cfg, "train", model_dir=dropping_dir, data=data).setup()
    rows = np.arange(8)
    mb = make_micro_batch(data, rows, objective)
    _, metrics, _ = tr.micro_batch_loss(mb)
    real = tr.adapter.encode_conditions([data.cond[i] for i in rows])  # the pass scores the real classes
    pos = tr.adapter.sequence_logprob(real, mb.codes, module=tr.engine, drop_seeds=mb.row_seeds)
    ref = tr.adapter.sequence_logprob(real, mb.codes, module=tr.ref_engine, drop_seeds=mb.row_seeds)
    assert tr.engine.module.training and torch.equal(pos.detach(), ref)
    scorer = ReferenceScorer(str(dropping_dir), {}, "float32", K, (4, 4), (L,))
    table = pa.table({"source_id": [f"synthetic:{i}" for i in rows], "codes": [list(map(int, r)) for r in data.codes[rows]],
                      "label": [data.cond[i] for i in rows], "neg_label": [data.neg_cond[i] for i in rows]})
    out = scorer(table)
    lp_pos = out.column("ref_logp_pos").to_numpy()
    np.testing.assert_array_equal(lp_pos, ref.float().numpy())
    assert float(metrics["rel_logp_pos_sum"]) == 0.0 and float(metrics["rel_logp_neg_sum"]) == 0.0


def test_trainer_moves_every_var_weight_and_never_the_reference(process_group, dropping_dir):
    from cca_ray.train.recipe import Trainer

    cfg = load_config("var-smoke", overrides=["train.lr=0.01", "train.max_steps=3", "train.micro_batch_size=4",
                                              "train.grad_accum=2"])
    tr = Trainer(cfg, "train", model_dir=dropping_dir, data=_pairs()).setup()
    before = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
    ref0 = {n: p.detach().clone() for n, p in tr.ref_engine.module.named_parameters()}
    metrics = tr.train()
    assert tr.step == 3 and np.isfinite(metrics["loss"])
    unchanged = [n for n, p in tr.engine.module.named_parameters() if torch.equal(before[n], p)]
    assert unchanged == [], unchanged
    assert all(torch.equal(ref0[n], p) for n, p in tr.ref_engine.module.named_parameters())


# -- the main job, end to end -----------------------------------------------------------------
def _cli(args, cwd, timeout=900):
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


@pytest.mark.e2e
def test_var_smoke_main_job(ray_local, tmp_path):
    """`python -m cca_ray.tune --preset var-smoke` from an empty directory: prepare fits the multi-scale VQVAE and
    writes flat 30-code rows with the scales in the manifest; pretrain, the sweep, evaluation and the export."""
    out = _cli(["cca_ray.tune", "--preset", "var-smoke"], cwd=tmp_path)
    work = tmp_path / "cca_work"
    manifest = json.loads((work / "data" / "train" / "manifest.json").read_text())
    assert manifest["tokenizer"]["code_shape"] == [L] and manifest["tokenizer"]["scales"] == list(SCALES)
    md = (work / "sweeps" / "var-smoke" / "results.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert [float(r["guidance"]) for r in rows if r["method"] == "base+CFG"] == [0.0, 1.0]
    assert [r for r in rows if r["method"].startswith("cca trial-")], out[-3000:]
    assert all(np.isfinite(float(r["fid"])) for r in rows)
    assert "registered as models:/cca-ray-var-smoke-best/" in out
    base = json.loads((work / "models" / "base" / "cca_ray.json").read_text())
    assert base["family"] == "var" and base["patch_nums"] == list(SCALES)
    export = next((work / "sweeps" / "var-smoke" / "trials").glob("trial-*/export"))
    sd = torch.load(export / "var_d2.pth", weights_only=True)  # VAR's own bare state dict
    assert {"class_emb.weight", "pos_1LC", "head.weight", "attn_bias_for_masking"} <= set(sd)
