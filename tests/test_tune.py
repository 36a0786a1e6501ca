"""The main job: search spaces, and the smoke sweep end to end on a real local Ray cluster + MLflow."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cca_ray import tracking
from cca_ray.config import ConfigError, load_config, with_overrides
from cca_ray.evaluate.report import format_table
from cca_ray.evaluate.sampling import balanced_conditions
from cca_ray.tracking import image_grid
from cca_ray.tune.sweep import load_space


def test_spaces_of_shipped_presets_load():
    for preset in ("smoke", "demo", "emu3-gen-a100"):
        space = load_space(load_config(preset))
        assert "train.lam" in space["params"] and space["metric"] == "fid_proxy"


def test_demo_searches_a_wide_space_with_enough_trials():
    """The demo's sweep is the one a user would start from, not a box around an earlier optimum."""
    cfg = load_config("demo")
    params = load_space(cfg)["params"]
    lam, beta = params["train.lam"], params["train.beta"]
    assert lam["type"] == beta["type"] == "loguniform"
    assert lam["high"] / lam["low"] >= 100 and beta["high"] / beta["low"] >= 10
    assert cfg.tune.num_trials >= 8
    assert set(cfg.tune.extra_methods) == {"lam_conditioned", "gft"}  # the demo draws their curves


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


def _wait_for(cond, proc, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


def _created_groups() -> list[dict]:
    """The cluster's CREATED placement groups, each with its bundles, creator job and whether that job ended."""
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_jobs, list_placement_groups

    created = {k for k, pg in placement_group_table().items() if pg["state"] == "CREATED"}
    if not created:
        return []
    jobs = {j.job_id: j.status for j in list_jobs(raise_on_missing_output=False) if j.job_id}
    return [{"id": pg.placement_group_id, "bundles": pg.bundles, "detached": pg.is_detached,
             "job": pg.creator_job_id, "job_status": jobs.get(pg.creator_job_id), "stats": pg.stats}
            for pg in list_placement_groups(detail=True, raise_on_missing_output=False)
            if pg.placement_group_id in created]


@pytest.mark.e2e
def test_smoke_main_job_from_an_empty_dir_interrupted_and_resumed(ray_local, tmp_path):
    """README's command, literally, from an empty directory (the default ./cca_work): SIGINT while the ASHA
    stage runs (one trial finished, the next one training), then the same command again. The rerun
    completes, reuses the CFG baseline and the finished trial, and ends in bounded time; then
    MLflow's parent/child runs, the plot and the registered model; then `ray job submit`."""
    import csv
    import signal

    work = tmp_path / "empty"
    work.mkdir()
    cmd = [sys.executable, "-m", "cca_ray.tune", "--preset", "smoke",  # with the optional knob methods, short grids
           "tune.extra_methods=[lam_conditioned,gft]", "eval.lam_values=[1.0,100.0]", "eval.beta_values=[1.0,0.5]"]
    sweep = work / "cca_work" / "sweeps" / "smoke"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        _wait_for(lambda: list(sweep.glob("trials/*/finished.json")), proc, 900, "a trial finished")
        first_done = {p.parent.name for p in sweep.glob("trials/*/finished.json")}
        time.sleep(3)
        t_int = time.time()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    first = (tmp_path / "first.log").read_text()
    assert rc == 130 and "interrupted; rerun the same command" in first, first[-3000:]
    print(f"SIGINT -> exit in {time.time() - t_int:.1f} s")
    deadline = time.time() + 30  # nothing left holding the cluster's CPUs
    while _created_groups() and time.time() < deadline:
        time.sleep(1)
    left = _created_groups()
    assert not left, f"placement groups left after Ctrl-C: {left}\n{first[-3000:]}"
    baseline_marker = sweep / "cfg_baseline.step.json"
    baseline_mtime = baseline_marker.stat().st_mtime
    finished_ckpts = {n: sorted(p.name for p in (sweep / "trials" / n).glob("checkpoint_*")) for n in first_done}

    t0 = time.time()
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    took = time.time() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    print(f"rerun took {took:.0f} s")
    assert took < 600, f"the rerun took {took:.0f} s"
    assert "reused (same base model and eval settings)" in out and "base model already at" in out
    assert baseline_marker.stat().st_mtime == baseline_mtime  # the CFG baseline was not recomputed
    for name in first_done:  # finished trials replay their reports: no training, no new checkpoints
        assert f"{name}: finished in an earlier run" in out, out[-5000:]
        assert sorted(p.name for p in (sweep / "trials" / name).glob("checkpoint_*")) == finished_ckpts[name]

    cfg = load_config("smoke", workdir=work / "cca_work")
    assert (sweep / "trade_off.png").stat().st_size > 10_000 and (sweep / "results.md").exists()
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    cfg_rows = [row for row in rows if row["method"] == "base+CFG"]
    assert [float(row["guidance"]) for row in cfg_rows] == cfg.eval.cfg_scales
    assert any(row["method"].startswith("cca trial-") for row in rows)
    for row in rows:
        assert int(row["n"]) == cfg.eval.num_samples and np.isfinite(float(row["fid"]))
        assert 0 <= float(row["accuracy"]) <= 1
    table = (sweep / "results.md").read_text()  # the optional knob methods: one model each, a point per λ / β
    for method, knob, values in (("λ-conditioned CCA", "lam", [1.0, 100.0]), ("GFT", "beta", [1.0, 0.5])):
        curve = [row for row in rows if row["method"] == method]
        assert [float(row[knob]) for row in curve] == values and all(np.isfinite(float(r["fid"])) for r in curve)
    assert "| λ-conditioned CCA | 0 | 100 |" in table and "| GFT | 0 | - | 0.5 |" in table

    c = tracking.client(cfg.mlflow_uri)  # the job's registry, whatever mlflow.set_registry_uri said in this process
    exp = c.get_experiment_by_name(cfg.experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "sweep-smoke"]
    assert len(parents) == 1  # the rerun reopened the sweep's run
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and not r.info.run_name.startswith("extra-")]
    assert len(children) == cfg.tune.num_trials
    for child in children:  # every trial reported the proxy ASHA ranks on, each step once
        steps = [s for s, _ in tracking.metric_history(cfg.mlflow_uri, child.info.run_id, "fid_proxy")]
        assert steps and steps == sorted(set(steps)), (child.info.run_name, steps)
        assert float(child.data.params["train.lam"]) > 0
    assert len(c.get_metric_history(parent.info.run_id, "gft_fid")) == 2
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trade_off.png", "results.md", "results.csv"} <= artifacts
    assert c.get_registered_model("cca-ray-smoke-best").latest_versions

    # the `ray job submit` path: a stage submitted through the cluster's job API
    from ray._private.worker import global_worker

    dash = global_worker.node.address_info["webui_url"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", f"http://{dash}",
           "--working-dir", str(Path(__file__).resolve().parents[1]), "--",
           "python", "-m", "cca_ray.evaluate", "--preset", "smoke", "--workdir", str(work / "cca_work"),
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


def test_step_keys_follow_the_fields_a_step_reads(tmp_path):
    from cca_ray import steps

    cfg = load_config("smoke", workdir=tmp_path)
    key = steps.step_key(cfg, ("eval", "sample"), base="sha256:1")
    assert key == steps.step_key(load_config("smoke", workdir=tmp_path), ("eval", "sample"), base="sha256:1")
    assert key == steps.step_key(with_overrides(cfg, {"train.lam": 9.0}), ("eval", "sample"), base="sha256:1")
    assert key != steps.step_key(with_overrides(cfg, {"eval.num_samples": 8}), ("eval", "sample"), base="sha256:1")
    assert key != steps.step_key(cfg, ("eval", "sample"), base="sha256:2")  # another base model
    out = tmp_path / "cfg_baseline"
    assert steps.cached(out, key) is None
    rows = steps.store(out, key, [{"fid": np.float64(1.5), "n": np.int64(4), "path": tmp_path}])
    assert rows == [{"fid": 1.5, "n": 4, "path": str(tmp_path)}] and steps.cached(out, key) == rows
    assert steps.cached(out, "another-key") is None


def test_trials_are_named_by_their_config(tmp_path):
    from cca_ray.tune.sweep import trial_name

    cfg = load_config("smoke", workdir=tmp_path)
    a = trial_name(cfg, {"train.lam": 1.0, "train.beta": 0.1}, "sha256:1")
    assert a.startswith("trial-") and a == trial_name(cfg, {"train.beta": 0.1, "train.lam": 1.0}, "sha256:1")
    assert a != trial_name(cfg, {"train.lam": 1.5, "train.beta": 0.1}, "sha256:1")
    assert a != trial_name(cfg, {"train.lam": 1.0, "train.beta": 0.1}, "sha256:2")
    assert a != trial_name(with_overrides(cfg, {"train.max_steps": 9}), {"train.lam": 1.0, "train.beta": 0.1},
                           "sha256:1")
    assert a == trial_name(with_overrides(cfg, {"eval.num_samples": 8}), {"train.lam": 1.0, "train.beta": 0.1},
                           "sha256:1")  # the final evaluation's size is not a trial's input
    assert a == trial_name(load_config("smoke", workdir=tmp_path / "elsewhere"),
                           {"train.lam": 1.0, "train.beta": 0.1}, "sha256:1")  # the workdir is not an input


def test_no_trial_finished_names_the_first_trials_error(tmp_path):
    from types import SimpleNamespace

    from cca_ray.tune.job import no_trial_message

    class Grid(list):  # what the message reads of a ResultGrid
        num_errors = 2

    err = RuntimeError("Traceback ...\n  File x.py\nConfigError: no model checkpoint at /w/models/base")
    grid = Grid([SimpleNamespace(error=None, path=str(tmp_path / "t0")),
                 SimpleNamespace(error=err, path=str(tmp_path / "t1")),
                 SimpleNamespace(error=RuntimeError("second"), path=str(tmp_path / "t2"))])
    msg = no_trial_message(grid, tmp_path / "sweeps" / "smoke")
    assert str(tmp_path / "t1" / "error.txt") in msg and "no model checkpoint at /w/models/base" in msg
    assert "second" not in msg and "rerun the same command" in msg and "3 started, 2 failed" in msg


def test_best_trial_is_selected_on_the_proxy_not_on_the_final_table():
    from cca_ray.tune.job import select_best

    points = [{"method": "cca trial-a", "fid": 0.70, "selection_metric": 0.95},
              {"method": "cca trial-b", "fid": 0.85, "selection_metric": 0.87},
              {"method": "cca trial-c", "fid": 0.60, "selection_metric": None}]
    best = select_best(points, "min")
    assert best["method"] == "cca trial-b (selected)" and points[0]["method"] == "cca trial-a"
    assert select_best([dict(p) for p in points[:2]], "max")["method"].startswith("cca trial-a")
