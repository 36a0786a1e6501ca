"""LlamaGen through the stages: config options mirroring LlamaGen's CLI, the one place they become
loader options, and the main job end to end on the llamagen-smoke preset (a real local Ray cluster,
DeepSpeed, MLflow), then a released-layout .pt file trained and evaluated by the stage CLIs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cca_ray.config import LLAMAGEN_GPT_MODELS, ConfigError, load_config
from cca_ray.models import checkpoint_family, load_model, loader_options
from cca_ray.models.llamagen import GPT_MODELS, build_tiny_llamagen

ROOT = Path(__file__).resolve().parents[1]
K, CLASSES = 32, 10  # the llamagen-smoke data: a 32-code k-means VQ, digits 0..9, 4x4 grids


def released_file(tmp_path, name="c2i_tiny_64.pt", seed=0) -> Path:
    """A GPT-tiny c2i file as LlamaGen's FSDP runs release theirs: a bare state dict with a stale freqs_cis."""
    saved = build_tiny_llamagen(tmp_path / f"built-{seed}", codebook_size=K, num_classes=CLASSES, image_size=64, seed=seed)
    state = torch.load(saved / "gpt.pt", weights_only=True)["model"]
    path = tmp_path / name
    torch.save({**state, "freqs_cis": torch.zeros(1 + 16, 16, 2)}, path)
    return path


RELEASED_OPTS = ["model.family=llamagen", "model.llamagen.gpt_model=GPT-tiny", "model.llamagen.image_size=64",
                 f"model.llamagen.num_classes={CLASSES}", f"model.llamagen.codebook_size={K}"]


# -- config -> loader options -----------------------------------------------------------
def test_gpt_model_choices_are_the_registry():
    assert LLAMAGEN_GPT_MODELS == tuple(GPT_MODELS)
    with pytest.raises(ConfigError, match="model.llamagen.gpt_model"):
        load_config("llamagen-smoke", overrides=["model.llamagen.gpt_model=GPT-M"])


def test_released_file_needs_gpt_model_and_image_size(tmp_path):
    with pytest.raises(ConfigError, match="model.llamagen.gpt_model and model.llamagen.image_size"):
        load_config("llamagen-smoke", overrides=[f"model.path={tmp_path / 'c2i_L_384.pt'}"])
    with pytest.raises(ConfigError, match="model.llamagen.image_size"):
        load_config("llamagen-smoke", overrides=[f"model.path={tmp_path / 'c2i_L_384.pt'}", "model.llamagen.gpt_model=GPT-L"])


def test_llamagen_options_with_another_family_are_refused():
    with pytest.raises(ConfigError, match="model.llamagen.image_size is set but model.family is emu3"):
        load_config("smoke", overrides=["model.llamagen.image_size=256"])


def test_loader_options_for_a_released_file_and_for_a_saved_dir(tmp_path):
    path = released_file(tmp_path)
    cfg = load_config("llamagen-smoke", overrides=[f"model.path={path}", *RELEASED_OPTS])
    opts = loader_options(cfg.model, cfg.base_model_dir)
    assert opts == {"family": "llamagen", "gpt_model": "GPT-tiny", "image_size": 64, "num_classes": CLASSES,
                    "codebook_size": K}
    model = load_model(cfg.base_model_dir, **opts)
    assert (model.family, model.grid, model.codebook_size) == ("llamagen", (4, 4), K)
    model.save(tmp_path / "saved")
    assert loader_options(cfg.model, tmp_path / "saved") == {}  # the sidecar knows; the config cannot contradict it
    assert checkpoint_family(tmp_path / "saved") == "llamagen"
    assert loader_options(load_config("smoke").model, tmp_path / "hf_dir") == {"family": "emu3"}


# -- the trainer on LlamaGen's GPT (DeepSpeed in one process: conftest's process_group) ------
def label_rows(n=32, seed=0):
    """Pairs as the data stage writes them for a class-labelled dataset: class ids, a different negative class."""
    from cca_ray.train.batches import TrainRows

    rng = np.random.default_rng(seed)
    lab = rng.integers(0, CLASSES, n)
    neg = (lab + rng.integers(1, CLASSES, n)) % CLASSES
    return TrainRows(codes=rng.integers(0, K, (n, 4, 4)).astype(np.int32), cond=lab.tolist(), neg_cond=neg.tolist(),
                     pos_null=rng.random(n) < 0.25, neg_null=rng.random(n) < 0.25, source="synthetic")


@pytest.mark.parametrize("section, objective", [("train", "cca_cfg"), ("train", "cca"), ("pretrain", "sft")])
def test_trainer_moves_every_llamagen_weight_and_never_the_reference(process_group, tmp_path, section, objective):
    """LlamaGen's GPT has no dropout: the trainer's null flags (cca_cfg) and condition dropout (sft) reach it
    as the null class. A few steps at a high lr change every parameter, the frozen reference none."""
    from cca_ray.models import build_tiny_model
    from cca_ray.train.recipe import Trainer

    cfg = load_config("llamagen-smoke", overrides=[f"{section}.objective={objective}", f"{section}.lr=0.01",
                                                   f"{section}.max_steps=3", f"{section}.micro_batch_size=4",
                                                   f"{section}.grad_accum=2", "pretrain.cond_dropout=0.5"])
    model_dir = build_tiny_model(tmp_path / "base", cfg.model, codebook_size=K, num_classes=CLASSES, grid=(4, 4))
    tr = Trainer(cfg, section, model_dir=model_dir, data=label_rows()).setup()
    before = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
    ref0 = {n: p.detach().clone() for n, p in tr.ref_engine.module.named_parameters()} if tr.ref_engine else {}
    metrics = tr.train()
    assert tr.step == 3 and np.isfinite(metrics["loss"])
    unchanged = [n for n, p in tr.engine.module.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, unchanged
    table = "cls_embedding.embedding_table.weight"  # its last row is the null class
    null_moved = not torch.equal(before[table][CLASSES], dict(tr.engine.module.named_parameters())[table][CLASSES])
    assert null_moved == (objective != "cca")  # null flags (cca_cfg) and condition dropout (sft) reach it; cca's never
    assert all(torch.equal(ref0[n], p) for n, p in tr.ref_engine.module.named_parameters()) if ref0 else True
    assert (objective == "sft") == (tr.ref_engine is None)


# -- the stages, end to end -----------------------------------------------------------------
def _cli(args, cwd, timeout=900):
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def _table_rows(md: str) -> list[dict]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


@pytest.mark.e2e
def test_llamagen_smoke_main_job_then_a_released_file_through_train_and_evaluate(ray_local, tmp_path):
    """`python -m cca_ray.tune --preset llamagen-smoke` from an empty directory; its results table; then a
    released-layout c2i .pt file as model.path (CLI-style options) through `train` and `evaluate`."""
    out = _cli(["cca_ray.tune", "--preset", "llamagen-smoke"], cwd=tmp_path)
    work = tmp_path / "cca_work"
    cfg = load_config("llamagen-smoke", workdir=work)
    rows = _table_rows((work / "sweeps" / "llamagen-smoke" / "results.md").read_text())
    assert [float(r["guidance"]) for r in rows if r["method"] == "base+CFG"] == cfg.eval.cfg_scales
    trials = [r for r in rows if r["method"].startswith("cca trial-")]
    assert trials, out[-3000:]
    for r in rows:
        assert int(r["n"]) == cfg.eval.num_samples and np.isfinite(float(r["fid"])) and 0 <= float(r["accuracy"]) <= 1
    for r in trials:  # guidance-free, with the sampled hyperparameters inside the tune space
        assert float(r["guidance"]) == 0 and 0.3 <= float(r["lam"]) <= 30 and 0.02 <= float(r["beta"]) <= 0.3
    assert "registered as models:/cca-ray-llamagen-smoke-best/" in out
    base = json.loads((work / "models" / "base" / "cca_ray.json").read_text())
    assert base["family"] == "llamagen" and base["gpt_config"]["null_class_row"]
    # the export is LlamaGen's own file layout: {"model": state_dict} with the official key names
    export = next((work / "sweeps" / "llamagen-smoke" / "trials").glob("trial-*/export"))
    sd = torch.load(export / "gpt.pt", weights_only=True)["model"]
    assert {"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "output.weight"} <= set(sd)

    # a released c2i file (bare state dict + freqs_cis, as XXL/3B ship) trained by the train CLI
    path = released_file(tmp_path, seed=3)
    opts = ["--workdir", str(work), f"model.path={path}", *RELEASED_OPTS, "train.max_steps=2"]
    text = _cli(["cca_ray.train", "--preset", "llamagen-smoke", *opts, "--run-name", "released"], cwd=tmp_path)
    trained = load_model(work / "checkpoints" / "released" / "export")
    before = load_model(path, **loader_options(load_config("llamagen-smoke", overrides=[f"model.path={path}",
                                                                                        *RELEASED_OPTS]).model, path))
    changed = [n for n, p in trained.module.named_parameters()
               if not torch.equal(p, dict(before.module.named_parameters())[n])]
    assert changed, text[-2000:]
    # ... and the released file itself evaluated (samples drawn in Ray tasks that load it with the options)
    text = _cli(["cca_ray.evaluate", "--preset", "llamagen-smoke", *opts, "--guidance", "0", "--num-samples", "16"],
                cwd=tmp_path)
    assert "| c2i_tiny_64.pt | 0 |" in text, text[-2000:]
