"""`python -m cca_ray.tune --preset emu3-sim`, literally, from an empty directory after `python -m cca_ray.sim_assets`:
the scaled-down twin of emu3-gen-a100 end to end, then its outputs checked for every path the real preset takes.

CCA_SIM_E2E_EXTRA_ARGS (development only; unset in CI): extra `key=value` overrides appended to the command,
e.g. `train.zero_stage=2` while the FID proxy under ZeRO-3 is being fixed. The assertions follow the
config the command ran, so with the variable unset they check the preset as it is (ZeRO-3).
"""

import contextlib
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cca_ray import tracking
from cca_ray.config import TrainConfig, load_config

EXTRA_ARGS = shlex.split(os.environ.get("CCA_SIM_E2E_EXTRA_ARGS", ""))


@pytest.fixture(scope="module")
def sim_run(ray_local, tmp_path_factory):
    """The job's directory, config and combined stdout/stderr, after one run of the literal command."""
    work = tmp_path_factory.mktemp("emu3-sim")
    subprocess.run([sys.executable, "-m", "cca_ray.sim_assets", "sim_assets"], cwd=work, check=True, timeout=300)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "cca_ray.tune", "--preset", "emu3-sim", *EXTRA_ARGS], cwd=work,
                       capture_output=True, text=True, timeout=900)
    print(f"python -m cca_ray.tune --preset emu3-sim {' '.join(EXTRA_ARGS)}: {time.time() - t0:.0f} s")
    out = r.stdout + r.stderr
    (work / "tune.log").write_text(out)
    assert r.returncode == 0, out[-6000:]
    with contextlib.chdir(work):  # the preset's relative paths, as the command resolved them
        cfg = load_config("emu3-sim", overrides=EXTRA_ARGS, workdir=work / "cca_work")
    return work, cfg, out


def trial_runs(cfg):
    c = tracking.client(cfg.mlflow_uri)
    exp = c.get_experiment_by_name(cfg.experiment)
    runs = c.search_runs([exp.experiment_id])
    return [r for r in runs if r.info.run_name.startswith("trial-")]


@pytest.mark.e2e
def test_emu3_sim_trains_with_the_real_presets_engine_settings(sim_run):
    """ZeRO stage, bf16 (or the CPU fallback the trainer names), gradient checkpointing and the precomputed
    reference: as the trials' MLflow runs recorded them."""
    from cca_ray.train.engine import cpu_bf16_flags

    _, cfg, out = sim_run
    runs = trial_runs(cfg)
    assert len(runs) == cfg.tune.num_trials
    for run in runs:
        p = run.data.params
        assert p["train.zero_stage"] == str(cfg.train.zero_stage) and p["train.reference"] == "precomputed"
        assert p["model.gradient_checkpointing"] == "True" and p["train.bf16"] == "True"
        precision = run.data.tags["precision"]
        assert precision.startswith("precision: bf16" if cpu_bf16_flags() else "precision: fp32 fallback"), precision
        assert run.data.tags["weights_loading"].startswith("weights loaded partitioned"), run.data.tags
        if "data_loading" in TrainConfig.model_fields:  # streamed per-rank shards, where the trainer has them
            assert p["train.data_loading"] == cfg.train.data_loading == "stream"
    assert (cfg.data_dir / "pairs_ref").is_dir()
    ref = pq.read_table(next((cfg.data_dir / "pairs_ref").glob("*.parquet")))
    assert {"ref_logp_pos", "ref_logp_neg"} <= set(ref.column_names)
    assert "precision: " in out


@pytest.mark.e2e
def test_emu3_sim_samples_on_held_out_captions_without_labels(sim_run):
    """Caption data: no labels in the shards, evaluation prompts are the held-out captions, and accuracy
    (no classifier for captions) is '-' in the table, not an error."""
    from cca_ray.sim_assets import captions

    work, cfg, out = sim_run
    holdout = pq.read_table(next((cfg.data_dir / "holdout").glob("*.parquet")), columns=["label", "prompt"])
    assert holdout.column("label").null_count == holdout.num_rows
    assert set(holdout.column("prompt").to_pylist()) <= set(captions())
    sweep = cfg.root / "sweeps" / "emu3-sim"
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [float(r["guidance"]) for r in rows if r["method"] == "base+CFG"] == cfg.eval.cfg_scales
    assert any(r["method"].startswith("cca trial-") for r in rows)
    for r in rows:
        assert r["accuracy"] == "" and int(r["n"]) == cfg.eval.num_samples and float(r["fid"]) >= 0
    assert "no labelled rows" not in out


@pytest.mark.e2e
def test_emu3_sim_scores_with_inception_v3_from_its_file_and_runs_the_proxy(sim_run):
    """FID with torch-fidelity's InceptionV3 from sim_assets' file (its cache keyed by the file's sha256), the
    FID proxy reported by every trial, exports and the best model registered."""
    from cca_ray.evaluate.extractors import file_sha256

    work, cfg, _ = sim_run
    name = f"inception-v3-{file_sha256(Path(cfg.eval.inception_weights))[:12]}"
    cached = list((cfg.root / "extractors" / "fidelity_cache").glob(f"*-{name}-stat-fid-2048.pt"))
    assert len(cached) >= 2  # the holdout (the table's reference) and the proxy's train-split reference
    for run in trial_runs(cfg):
        proxy = tracking.metric_history(cfg.mlflow_uri, run.info.run_id, "fid_proxy")
        assert proxy, run.info.run_name
    c = tracking.client(cfg.mlflow_uri)
    assert c.get_registered_model(f"{cfg.experiment}-best").latest_versions
