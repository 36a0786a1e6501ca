"""The main job: search spaces, and the smoke sweep end to end on a real local Ray cluster + MLflow."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cca_ray.config import ConfigError, load_config, with_overrides
from cca_ray.evaluate.report import format_table
from cca_ray.evaluate.sampling import balanced_conditions
from cca_ray.tracking import image_grid
from cca_ray.tune.sweep import load_space


def test_spaces_of_shipped_presets_load():
    for preset in ("smoke", "demo", "emu3-gen-a100"):
        space = load_space(load_config(preset))
        assert "train.lam" in space["params"] and space["metric"] == "fid_proxy"


def test_space_naming_unknown_field_is_refused(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("params:\n  train.lamda: {type: loguniform, low: 0.1, high: 1}\n")
    with pytest.raises(ConfigError, match="train.lamda"):
        load_space(load_config("smoke", overrides=[f"tune.space={bad}"]))
    bad.write_text("params:\n  train.lam: {type: gaussian, low: 0.1, high: 1}\n")
    with pytest.raises(ConfigError, match="type must be one of"):
        load_space(load_config("smoke", overrides=[f"tune.space={bad}"]))


def test_trial_overrides_are_validated():
    cfg = load_config("smoke")
    assert with_overrides(cfg, {"train.lam": 3.0}).train.lam == 3.0
    with pytest.raises(ConfigError, match="train.lam"):
        with_overrides(cfg, {"train.lam": -1.0})


def test_balanced_conditions_and_grid():
    prompts, labels = balanced_conditions({0: "zero", 1: "one", 2: "two"}, 7)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0] and prompts[4] == "one"
    ids, labels = balanced_conditions({0: "zero", 1: "one", 2: "two"}, 4, "label", first=2)
    assert ids == [2, 0, 1, 2] and labels.tolist() == ids
    g = image_grid(np.full((12, 4, 5, 1), 7, np.uint8), ncols=5)
    assert g.shape == (12, 25, 1) and g[:8].min() == 7 and g[8:, :10].min() == 7 and g[8:, 10:].max() == 0


def test_results_table_format():
    t = format_table([{"method": "cca", "guidance": 0.0, "fid": 1.23456, "n": 10}])
    assert t.splitlines()[0].startswith("| method | guidance |") and "| cca | 0 | - | - | 1.235 |" in t


@pytest.mark.e2e
def test_smoke_main_job_end_to_end(ray_local, tmp_path):
    """prepare -> pretrain -> CFG baseline -> ASHA sweep -> evaluation -> MLflow parent/child runs + plot."""
    from mlflow.tracking import MlflowClient

    from cca_ray.tune.job import run_main_job

    cfg = load_config("smoke", workdir=tmp_path, overrides={  # with the optional knob methods, on short grids
        "tune.extra_methods": ["lam_conditioned", "gft"], "eval.lam_values": [1.0, 100.0],
        "eval.beta_values": [1.0, 0.5]})
    out = run_main_job(cfg)

    assert Path(out["plot"]).stat().st_size > 10_000
    assert [r["guidance"] for r in out["cfg_rows"]] == cfg.eval.cfg_scales
    assert any(p["method"].startswith("cca trial-") for p in out["points"])
    for row in out["cfg_rows"] + out["points"]:
        assert row["n"] == cfg.eval.num_samples and np.isfinite(row["fid"]) and 0 <= row["accuracy"] <= 1
    # λ-conditioned CCA and GFT: one model each, a point per λ / β, in the table
    assert [r["lam"] for r in out["curves"]["lam_conditioned"]] == [1.0, 100.0]
    assert [r["beta"] for r in out["curves"]["gft"]] == [1.0, 0.5]
    assert all(np.isfinite(r["fid"]) for c in out["curves"].values() for r in c)
    assert "| λ-conditioned CCA | 0 | 100 |" in out["table"] and "| GFT | 0 | - | 0.5 |" in out["table"]

    c = MlflowClient(cfg.mlflow_uri)
    exp = c.get_experiment_by_name(cfg.experiment)
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "sweep-smoke")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and not r.info.run_name.startswith("extra-")]
    assert len(children) == cfg.tune.num_trials
    for child in children:  # every trial reported the proxy ASHA ranks on
        assert c.get_metric_history(child.info.run_id, "fid_proxy"), child.info.run_name
        assert float(child.data.params["train.lam"]) > 0
    assert len(c.get_metric_history(parent.info.run_id, "gft_fid")) == 2
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trade_off.png", "results.md", "results.csv"} <= artifacts
    assert out["model_uri"].startswith("models:/cca-ray-smoke-best/")
    assert c.get_registered_model("cca-ray-smoke-best").latest_versions

    # the `ray job submit` path: a stage submitted through the cluster's job API
    from ray._private.worker import global_worker

    dash = global_worker.node.address_info["webui_url"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", f"http://{dash}",
           "--working-dir", str(Path(__file__).resolve().parents[1]), "--",
           "python", "-m", "cca_ray.evaluate", "--preset", "smoke", "--workdir", str(tmp_path),
           "--guidance", "0", "--num-samples", "16"]
    for _ in range(6):  # the job agent can lag the dashboard by some seconds on a busy machine
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if "No available agent" not in r.stderr:
            break
        time.sleep(15)
    if "No available agent" in r.stderr:
        pytest.skip("this cluster's job agent never came up (its port is held by another Ray cluster on the machine)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)


def test_trade_off_plot_with_every_kind_of_point(tmp_path):
    from cca_ray.evaluate.report import trade_off_plot

    cfg_rows = [{"guidance": g, "fid": 2 - g / 2, "isc_mean": 5 + g, "precision": 0.5, "recall": 0.5 - g / 10}
                for g in (0.0, 1.0, 2.0)]
    points = [  # baselines carry only the hyperparameter they have
        {"method": "cca trial-a", "lam": 1.0, "beta": 0.1, "fid": 1.0, "isc_mean": 6.0, "precision": 0.6, "recall": 0.5},
        {"method": "dpo", "lam": None, "beta": 0.1, "fid": 1.5, "isc_mean": 6.0, "precision": 0.6, "recall": 0.5},
        {"method": "unlearning", "lam": 0.05, "beta": None, "fid": 2.0, "isc_mean": 5.0, "precision": 0.4, "recall": 0.4},
    ]
    out = trade_off_plot(cfg_rows, points, tmp_path / "p.png")
    assert out.stat().st_size > 10_000
    curves = {  # one knob model each, scored at several knob values (paper Figure 4)
        "lam_conditioned": [{"lam": v, "fid": 1.5 - v / 100, "isc_mean": 5.5 + v / 50, "precision": 0.5, "recall": 0.4}
                            for v in (1.0, 10.0, 100.0)],
        "gft": [{"beta": b, "fid": 1.2 + b, "isc_mean": 6 - b, "precision": 0.6, "recall": 0.3 + b / 5} for b in (1.0, 0.5)],
    }
    with_curves = trade_off_plot(cfg_rows, points, tmp_path / "q.png", curves=curves)
    assert with_curves.stat().st_size > out.stat().st_size
