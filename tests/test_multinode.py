"""Multi-node training, simulated on one machine with `ray.cluster_utils.Cluster`.

A head node (no CPUs: it hosts the driver, the Train controller and Ray's services) and two worker
"nodes" of one CPU each, so the two Ray Train workers (one CPU each) must land on different nodes.
The workdir, and with it the Train `storage_path`, is one directory every node sees: what S3/NFS
is on a real cluster. A short CCA run (smoke preset: 6 steps, checkpoints at 3 and 6) writes
both ranks' ZeRO shards into that storage; after the first checkpoint a worker node is removed
mid-run and a replacement joins, and the run must resume from step 3 and finish at step 6 having
consumed every batch exactly once.

Why the scenario runs in a subprocess with its own RAY_TMPDIR: a driver can join only one cluster,
and the session fixture `ray_local` may already be connected in this pytest process. Worse,
Ray Train's detached PlacementGroupCleaner finds "its" cluster with no address given: RAY_ADDRESS,
else `<ray temp dir>/ray_current_cluster` (which `Cluster` writes), else pgrep for GCS processes,
which fails with "multiple active Ray instances" when two clusters run on one machine. If that
file pointed at another cluster, a cleaner would ask the wrong GCS about its controller, think it
dead and remove a live run's placement group; and `ray.init()` in anyone's process on this machine
would join our test cluster. So the child gets a private RAY_TMPDIR (its `ray_current_cluster`
is invisible to other clusters and names only ours) and exports RAY_ADDRESS of its own cluster
to every node it starts, and the parent's RAY_ADDRESS (set by `ray_local`) never reaches it.

Run by hand: `python tests/test_multinode.py WORKDIR` (prints the JSON the test checks).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

FIRST_CHECKPOINT, HOLD_STEP, FINAL_STEP = 3, 4, 6  # smoke preset: train.max_steps 6, checkpoint_every 3
RESULT = "multinode_result.json"
RUN_NAME = "cca-two-nodes"


def test_two_node_training_lands_shards_and_survives_losing_a_node(tmp_path):
    from cca_ray.config import load_config
    from cca_ray.data.shards import read_manifest
    from cca_ray.train.batches import BatchPlan

    # /tmp/ccamn-XXXX: Ray's unix socket paths under it must stay below 108 bytes (pytest's tmp_path is too long)
    ray_tmp = tempfile.mkdtemp(prefix="ccamn-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=540, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"scenario failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    out = json.loads((tmp_path / RESULT).read_text())
    print(f"two-node scenario: {time.monotonic() - t0:.0f} s; {out['timings']}")

    # 1. the two ranks ran on the two worker nodes, never on the head
    first, second = out["placement"]["first"], out["placement"]["second"]
    assert set(first) == set(second) == {"0", "1"}, out["placement"]
    assert len(set(first.values())) == 2 and set(first.values()) <= set(out["worker_nodes"]), out
    assert out["head_node"] not in first.values()
    # ... and after the removal, on the surviving node and the replacement
    assert out["removed_node"] in first.values()
    assert set(second.values()) == set(first.values()) - {out["removed_node"]} | {out["replacement_node"]}

    # 2. both ranks' shards landed in the shared storage, in every kept checkpoint
    run_dir = tmp_path / "checkpoints" / RUN_NAME
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == [f"checkpoint_{FIRST_CHECKPOINT:06d}", f"checkpoint_{FINAL_STEP:06d}"], kept
    for name in kept:
        ds = run_dir / name / "ds"
        shards = sorted(p.name for p in ds.glob("zero_pp_rank_*_optim_states.pt"))
        assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], \
            f"{name}: {shards}"
        assert (ds / "mp_rank_00_model_states.pt").exists()
        assert json.loads((run_dir / name / "trainer_state.json").read_text())["step"] == int(name.split("_")[1])
    assert out["checkpoint"] == str(run_dir / f"checkpoint_{FINAL_STEP:06d}")

    # 3. one restart, from the first checkpoint, to the final step; each batch consumed once
    m = out["metrics"]
    assert m["step"] == FINAL_STEP and m["resumed_from_step"] == FIRST_CHECKPOINT, m
    cfg = load_config("smoke", workdir=tmp_path)
    n_pairs = read_manifest(cfg.data_dir / "pairs")["counts"]["rows"]
    plan = BatchPlan(n_pairs, 2, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed)
    assert m["data_fingerprint"] == sum(plan.step_fingerprint(s) for s in range(FINAL_STEP)) % (2**31 - 1)
    # the consolidated export merges both nodes' shards into weights evaluate/serve can load
    assert (Path(out["export_dir"]) / "config.json").exists()


# -- the scenario (runs in the child process) ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hold_until_node_removed(shared: str):
    """extra_report_fn for every rank, every step: note which node this rank runs on; at HOLD_STEP (the
    first step after the first checkpoint) the first worker group waits here until the driver has
    removed a node (it dies waiting); the restarted group finds the marker and carries on."""

    def hook(trainer) -> dict:
        import ray

        d = Path(shared)
        with open(d / f"placement_rank{trainer.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.step, "node": ray.get_runtime_context().get_node_id()}) + "\n")
        if trainer.step == HOLD_STEP and not (d / "node_removed").exists():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:  # the node removal kills this worker group
                time.sleep(0.5)
            raise TimeoutError(f"rank {trainer.rank}: no node was removed within 240 s")
        return {}

    return hook


def _wait_for_checkpoint(run_dir: Path, name: str, training: threading.Thread, timeout_s: float = 300) -> None:
    """Until Ray Train has registered checkpoint `name`: its snapshot in the run dir names it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while not (snapshot.exists() and name in snapshot.read_text()):
        if not training.is_alive():
            raise RuntimeError(f"training ended before {name} was registered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{snapshot} did not name {name} within {timeout_s} s")
        time.sleep(0.5)


def run_scenario(workdir: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from cca_ray.config import load_config
    from cca_ray.data.prepare import prepare
    from cca_ray.train.pretrain import build_init_model
    from cca_ray.train.driver import run_training

    t0 = time.monotonic()
    # Ray joins a cluster at the node's own IP (it rewrites 127.0.0.1 to it), like `ray_local` does; only the
    # dashboard stays on loopback. Every node we start (the head included) inherits RAY_ADDRESS, so Train's
    # PlacementGroupCleaner asks our GCS and no other.
    gcs_port = _free_port()
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    store = {"object_store_memory": 100 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": gcs_port, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        # other clusters on this machine may hold the default ports (8265, 52365)
        "dashboard_port": _free_port(), "dashboard_agent_listen_port": _free_port(), **store})
    worker_args = {"num_cpus": 1, **store}
    try:
        nodes = [cluster.add_node(**worker_args) for _ in range(2)]
        cluster.wait_for_nodes()
        assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
        ray.init(address=cluster.address, log_to_driver=False)
        out: dict = {"timings": {"cluster_up_s": round(time.monotonic() - t0, 1)},
                     "head_node": cluster.head_node.node_id, "worker_nodes": [n.node_id for n in nodes]}

        cfg = load_config("smoke", workdir=workdir)  # workdir = shared storage: data, base model, checkpoints
        t = time.monotonic()
        prepare(cfg)  # Ray Data tasks on the worker nodes
        model_dir = build_init_model(cfg, workdir / "models" / "init")  # random init: resume mechanics, not quality
        out["timings"]["prepare_s"] = round(time.monotonic() - t, 1)

        shared = workdir / "multinode"
        shared.mkdir()
        # Training runs in a thread; the main thread plays the cluster operator (Ray starts nodes from the
        # main thread only: Node() installs a SIGTERM handler).
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["result"] = run_training(cfg, "train", run_name=RUN_NAME, model_dir=model_dir,
                                                  extra_report_fn=_hold_until_node_removed(str(shared)),
                                                  extra_report_every=1)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                outcome["error"] = e

        t = time.monotonic()
        training = threading.Thread(target=train, name="training", daemon=True)
        training.start()
        _wait_for_checkpoint(cfg.checkpoint_dir / RUN_NAME, f"checkpoint_{FIRST_CHECKPOINT:06d}", training)
        out["timings"]["first_checkpoint_s"] = round(time.monotonic() - t, 1)
        victim = nodes[0]  # each worker node runs one Train worker
        cluster.remove_node(victim)  # kills its raylet and the Train worker on it
        (shared / "node_removed").write_text(victim.node_id)
        out["removed_node"] = victim.node_id
        out["replacement_node"] = cluster.add_node(**worker_args).node_id
        training.join(timeout=420)
        if training.is_alive():
            raise TimeoutError("training did not finish within 420 s of the node removal")
        if "error" in outcome:
            raise outcome["error"]
        res = outcome["result"]
        out["timings"]["train_s"] = round(time.monotonic() - t, 1)

        placement: dict[str, dict[str, str]] = {"first": {}, "second": {}}
        for rank in (0, 1):
            for rec in map(json.loads, (shared / f"placement_rank{rank}.jsonl").read_text().splitlines()):
                # steps up to HOLD_STEP ran in the first worker group; later ones only in the restarted one
                attempt = "first" if rec["step"] <= FIRST_CHECKPOINT else "second" if rec["step"] > HOLD_STEP else None
                if attempt:
                    placement[attempt][str(rank)] = rec["node"]
        out.update(placement=placement, metrics=res.metrics, checkpoint=str(res.checkpoint),
                   export_dir=str(res.export_dir))
        out["timings"]["total_s"] = round(time.monotonic() - t0, 1)
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    workdir = Path(sys.argv[1]).resolve()
    result = run_scenario(workdir)
    (workdir / RESULT).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
