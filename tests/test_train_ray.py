"""End to end on a real local Ray cluster: prepare -> pretrain (2 Ray Train workers, DeepSpeed ZeRO-2)
-> CCA with a worker failure injected mid-run, resumed from the last checkpoint; MLflow holds the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cca_ray import tracking
from cca_ray.config import load_config

pytestmark = pytest.mark.e2e

CCA_METRICS = ("loss", "rel_logp_pos", "rel_logp_neg", "pair_accuracy", "grad_norm", "lr", "tokens_per_s",
               "samples_per_s")


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    from cca_ray.data.prepare import prepare

    cfg = load_config("smoke", overrides=["pretrain.max_steps=4", "pretrain.checkpoint_every=4"],
                      workdir=tmp_path_factory.mktemp("train_e2e"))
    prepare(cfg)
    return cfg


@pytest.fixture(scope="module")
def base_model(prepared):
    from cca_ray.train.pretrain import pretrain

    return pretrain(prepared)


def _run(cfg, run_name: str):
    c = tracking.client(cfg.mlflow_uri)
    exp = c.get_experiment_by_name(cfg.experiment)
    return tracking.find_run(cfg.mlflow_uri, exp.experiment_id, run_name)


def test_pretrain_builds_the_base_model(prepared, base_model):
    from cca_ray.models import load_model

    assert base_model == prepared.base_model_dir
    model = load_model(base_model)
    assert model.codebook_size == 32
    runs = tracking.client(prepared.mlflow_uri).search_runs(
        [tracking.client(prepared.mlflow_uri).get_experiment_by_name(prepared.experiment).experiment_id],
        filter_string="tags.stage = 'pretrain'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["pretrain.objective"] == "sft"
    steps = [s for s, _ in tracking.metric_history(prepared.mlflow_uri, runs[0].info.run_id, "loss")]
    assert steps == [2, 4]


def test_cca_survives_an_injected_worker_failure(prepared, base_model):
    """Rank 1 raises at the start of step 5; the last checkpoint is step 3, so the restarted worker group
    must resume there and run steps 4, 5, 6 exactly once: the final data fingerprint (a sum over the
    rows each step consumed, carried in the checkpoint) equals that of an uninterrupted run."""
    from cca_ray.models import load_model
    from cca_ray.train.driver import run_training
    from cca_ray.data import read_manifest
    from cca_ray.train.batches import BatchPlan

    def fake_fid_proxy(trainer) -> dict:  # stands in for tune's FID-proxy hook (a local function: pickled by value)
        return {"fid_proxy": float(trainer.step)}

    cfg = prepared.model_copy(deep=True)
    cfg.train.inject_failure_at_step = 5  # smoke: max_steps 6, checkpoint_every 3, log_every 2
    res = run_training(cfg, "train", run_name="cca-failure", extra_report_fn=fake_fid_proxy, extra_report_every=3)

    assert (res.run_dir / ".injected_failure_step_5").exists()  # the failure really happened
    m = res.metrics
    assert m["step"] == 6 and m["resumed_from_step"] == 3
    n_pairs = read_manifest(cfg.data_dir / "pairs")["counts"]["rows"]
    plan = BatchPlan(n_pairs, 2, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed)
    assert m["data_fingerprint"] == sum(plan.step_fingerprint(s) for s in range(6)) % (2**31 - 1)
    kept = sorted(p.name for p in res.run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_000003", "checkpoint_000006"] and res.checkpoint.name == "checkpoint_000006"

    run_id = _run(cfg, "cca-failure")
    assert run_id == res.mlflow_run_id
    run = tracking.client(cfg.mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.objective"] == "cca"
    for key in CCA_METRICS:
        assert key in run.data.metrics, key
    steps = sorted({s for s, _ in tracking.metric_history(cfg.mlflow_uri, run_id, "loss")})
    assert steps[-1] == 6 and {2, 3, 6} <= set(steps)
    assert m["fid_proxy"] == 6.0  # the extra report reached the final result (what Tune would see)
    assert tracking.metric_history(cfg.mlflow_uri, run_id, "fid_proxy") == [(3, 3.0), (6, 6.0)]

    exported = load_model(res.export_dir)  # what evaluate/serve load
    base = load_model(base_model)
    moved = [n for n, p in exported.module.named_parameters()
             if "vqmodel" not in n and not torch.equal(p, base.module.get_parameter(n))]
    assert moved, "the export holds the base weights, not the trained ones"
    assert Path(res.export_dir) == res.run_dir / "export"


def test_worker_start_up_is_bounded_and_names_the_resources(prepared, base_model):
    """More CPUs per worker than the cluster has: after train.start_retries + 1 tries of
    train.start_timeout_s the run fails, naming what it asked for and what the cluster has."""
    import time

    from cca_ray.config import with_overrides
    from cca_ray.train.driver import WorkerStartError, run_training

    cfg = with_overrides(prepared, {"train.cpus_per_worker": 64, "train.start_timeout_s": 3, "train.start_retries": 1})
    t0 = time.time()
    with pytest.raises(WorkerStartError) as e:
        run_training(cfg, "train", run_name="cca-too-big")
    assert time.time() - t0 < 120
    msg = str(e.value)
    assert "2 Ray Train workers x {CPU 64}" in msg and "2 tries of 3 s" in msg, msg
    assert "The cluster has CPU 4" in msg and "train.num_workers" in msg, msg


def _ray_train_workers() -> set[int]:
    """Pids of live processes titled ray::RayTrainWorker (Ray sets the title of every actor process)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::RayTrainWorker"):
                pids.add(int(proc.name))
    return pids


def test_sigkill_of_a_worker_resumes_exactly(prepared, base_model):
    """`python -m cca_ray.train` as a user runs it; once Ray committed the step-3 checkpoint, one Ray Train
    worker process is SIGKILLed. The run finishes: MLflow holds each of steps 1..12 exactly once, the final step
    is 12 and the data position equals an uninterrupted run's."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from cca_ray.data import read_manifest
    from cca_ray.train.batches import BatchPlan

    cfg = prepared
    run_dir = cfg.checkpoint_dir / "cca-sigkill"
    cmd = [sys.executable, "-m", "cca_ray.train", "--preset", "smoke", "--workdir", str(cfg.root),
           "--run-name", "cca-sigkill", "train.max_steps=12", "train.log_every=1", "train.checkpoint_every=3"]
    log_path = cfg.root / "sigkill.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 600
        rank1 = None
        snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray's list of committed checkpoints

        def committed() -> bool:
            return snapshot.exists() and '"checkpoint_000003"' in snapshot.read_text()

        while rank1 is None or not committed():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            # this run's rank-1 worker, as its controller announced it (other clusters may run workers too)
            found = re.findall(r"pid=(\d+)\) world_rank=1,", log_path.read_text())
            rank1 = int(found[0]) if found else None
            time.sleep(0.2)
        assert rank1 in _ray_train_workers(), f"pid {rank1} is not titled ray::RayTrainWorker"
        t_kill = time.time()
        os.kill(rank1, signal.SIGKILL)
        rc = proc.wait(timeout=600)
    out = (cfg.root / "sigkill.log").read_text()
    assert rc == 0, out[-4000:]
    print(f"SIGKILL -> run finished {time.time() - t_kill:.0f} s later")
    assert "run cca-sigkill: step 12" in out

    run_id = _run(cfg, "cca-sigkill")
    assert [s for s, _ in tracking.metric_history(cfg.mlflow_uri, run_id, "loss")] == list(range(1, 13))
    resumed = [v for _, v in tracking.metric_history(cfg.mlflow_uri, run_id, "resumed_from_step")]
    assert max(resumed) >= 3, f"no restart from a checkpoint happened: {resumed}"  # the kill really hit mid-run
    state = json.loads((run_dir / "checkpoint_000012" / "trainer_state.json").read_text())
    n_pairs = read_manifest(cfg.data_dir / "pairs")["counts"]["rows"]
    plan = BatchPlan(n_pairs, 2, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed)
    assert state["step"] == 12
    assert state["data_fingerprint"] == sum(plan.step_fingerprint(s) for s in range(12)) % (2**31 - 1)
