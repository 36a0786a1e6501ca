"""ZeRO-3 on 2 real Ray Train workers: the FID proxy at a checkpoint step (no rank samples a partition, no
hang), and the export the workers write from their gathered weights (what the driver keeps, instead of
consolidating the shards itself). bf16 with model.dtype bfloat16: the 16-bit export path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cca_ray.config import ConfigError, load_config

OVERRIDES = ["train.zero_stage=3", "train.bf16=true", "model.dtype=bfloat16", "train.max_steps=4",
             "train.checkpoint_every=2", "train.log_every=2", "eval.proxy_num_samples=16", "eval.workers=2",
             "data.max_images=256"]
RUN_TIMEOUT_S = 240  # a collective that no longer lines up hangs forever: fail instead

# the run, in its own driver process joined to the test's cluster (RAY_ADDRESS): a hang is killed by the timeout
RUN = textwrap.dedent("""
    import json, sys
    from cca_ray.config import load_config
    from cca_ray.evaluate.job import eval_setup, proxy_setup
    from cca_ray.train.driver import run_training
    from cca_ray.tune.sweep import FidProxy

    cfg = load_config("smoke", overrides=json.loads(sys.argv[1]), workdir=sys.argv[2])
    res = run_training(cfg, "train", run_name="zero3", extra_report_fn=FidProxy(proxy_setup(eval_setup(cfg))),
                       extra_report_every=2)
    print("RESULT " + json.dumps({"metrics": res.metrics, "export": str(res.export_dir),
                                  "checkpoint": str(res.checkpoint), "run_dir": str(res.run_dir),
                                  "run_id": res.mlflow_run_id}))
""")


def test_in_process_proxy_is_refused_under_zero3():
    with pytest.raises(ConfigError, match="eval.proxy_runner"):
        load_config("smoke", overrides=["train.zero_stage=3", "eval.proxy_runner=in_process"])
    assert load_config("smoke", overrides=["train.zero_stage=3"]).proxy_runs_as_task()
    assert not load_config("smoke").proxy_runs_as_task()  # CPU, ZeRO-2: today's fast in-process path
    assert load_config("smoke", overrides=["eval.proxy_runner=task"]).proxy_runs_as_task()


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    from cca_ray.data.prepare import prepare
    from cca_ray.evaluate.job import eval_setup
    from cca_ray.train.pretrain import build_init_model

    cfg = load_config("smoke", overrides=OVERRIDES, workdir=tmp_path_factory.mktemp("zero3"))
    prepare(cfg)
    build_init_model(cfg, cfg.base_model_dir)  # a random-init base: the run only has to move it
    eval_setup(cfg, progress=False)  # trains and caches the mnist-cnn extractor before the timed run
    return cfg


@pytest.fixture(scope="module")
def run(prepared):
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(OVERRIDES), str(prepared.root)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _weights(path) -> dict[str, torch.Tensor]:
    from cca_ray.models import load_model

    return load_model(path, dtype=torch.bfloat16).module.state_dict()


def test_proxy_at_checkpoint_steps_equals_the_proxy_of_the_export(prepared, run):
    from pathlib import Path

    from cca_ray import tracking
    from cca_ray.evaluate.job import eval_setup, evaluate_model, proxy_setup
    from cca_ray.train import checkpoint as ckpt

    m = run["metrics"]
    assert m["step"] == 4 and m["proxy_s"] > 0
    assert [s for s, _ in tracking.metric_history(prepared.mlflow_uri, run["run_id"], "fid_proxy")] == [2, 4]
    proxy_dir = Path(run["run_dir"]) / "proxy_export"
    assert ckpt.export_source(proxy_dir)["step"] == 4  # the last proxy's weights, written by the ranks
    assert ckpt.export_source(run["export"])["written_by"] == "training ranks"

    cfg = prepared
    again, _ = evaluate_model(proxy_setup(eval_setup(cfg, progress=False)), run["export"], guidance=0.0,
                              n=cfg.eval.proxy_num_samples, metrics=("fid",), seed=cfg.eval.proxy_seed)
    assert abs(again["fid"] - m["fid_proxy"]) < 1e-6, (again["fid"], m["fid_proxy"])


def test_partitioned_loading_holds_the_checkpoint_weights(prepared, tmp_path):
    """2 ZeRO-3 workers load the base model partitioned (rank 0 alone reads it, each rank keeps its slice).
    One step at lr 1e-30 moves no weight by more than 1e-30, so the ranks' export must equal the base model:
    a parameter left unfilled, or filled from the wrong slice, would show."""
    from cca_ray import tracking

    overrides = [o for o in OVERRIDES if not o.startswith(("train.max_steps", "train.checkpoint_every"))]
    overrides += ["train.max_steps=1", "train.checkpoint_every=1", "train.lr=1e-30", "train.warmup_steps=0"]
    code = RUN.replace("extra_report_fn=FidProxy(proxy_setup(eval_setup(cfg))),", "")
    code = code.replace('run_name="zero3"', 'run_name="zero3-load"')
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(overrides), str(prepared.root)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    tags = tracking.client(prepared.mlflow_uri).get_run(res["run_id"]).data.tags
    assert tags["weights_loading"].startswith("weights loaded partitioned"), tags
    ours, base = _weights(res["export"]), _weights(prepared.base_model_dir)
    assert ours.keys() == base.keys()
    for k in ours:  # a step of 1e-30 moves a weight of exactly 0 to about ±1e-30 (bf16 keeps fp32's range)
        torch.testing.assert_close(ours[k], base[k], rtol=0, atol=1e-20, msg=k)


def test_workers_export_equals_the_consolidation_which_stays_the_fallback(prepared, run, tmp_path):
    """The driver keeps the workers' export when it holds the final checkpoint's step; otherwise it
    consolidates the shards (zero_to_fp32), and both agree to bf16 precision."""
    from pathlib import Path

    from cca_ray.train import checkpoint as ckpt
    from cca_ray.train.driver import final_export

    export, last, run_dir = Path(run["export"]), Path(run["checkpoint"]), Path(run["run_dir"])
    assert export == run_dir / "export" and ckpt.export_source(export)["step"] == 4
    assert final_export(prepared, prepared.train, last, prepared.base_model_dir, run_dir) == export  # reused
    workers = shutil.copytree(export, tmp_path / "workers")

    source = ckpt.export_source(export)
    (export / ckpt.SOURCE_FILE).write_text(json.dumps({**source, "step": 3}))  # as if it predated the checkpoint
    out = final_export(prepared, prepared.train, last, prepared.base_model_dir, run_dir)
    assert ckpt.export_source(out)["checkpoint"] == str(last)  # consolidated by the driver this time

    ours, theirs = _weights(workers), _weights(out)
    assert ours.keys() == theirs.keys()
    base = _weights(prepared.base_model_dir)
    assert any(not torch.equal(ours[k], base[k]) for k in ours), "the export holds the base weights"
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], msg=k)  # bf16's tolerances


def _load_rank(rank: int, port: int, model_dir: str, out: str) -> None:
    """One rank of a 2-process gloo group (as Ray Train sets up): load_partitioned, its outcome to out/<rank>."""
    from pathlib import Path

    import torch.distributed as dist

    from cca_ray.train import gathered
    from cca_ray.train.engine import local_process_group, quiet_deepspeed

    local_process_group(port, rank=rank, world_size=2)
    quiet_deepspeed(False)
    cfg = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2, "zero_optimization": {"stage": 3}}
    try:
        gathered.load_partitioned(model_dir, {}, dtype=torch.float32, ds_config=cfg, rank=rank)
        outcome = "loaded"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    Path(out, str(rank)).write_text(outcome)
    dist.barrier()
    dist.destroy_process_group()  # left to interpreter exit, gloo's threads can abort the process (SIGABRT)


def test_a_checkpoint_rank_0_cannot_read_fails_every_rank_with_its_name(tmp_path):
    """Rank 0 alone reads the weights: when that fails (a truncated weights file), the other ranks, which only
    built their slices from config.json, must fail too, naming the checkpoint, instead of waiting forever."""
    import torch.multiprocessing as mp

    from cca_ray.models.emu3 import build_tiny_emu3
    from cca_ray.train.engine import free_port

    model = build_tiny_emu3(tmp_path / "model", codebook_size=64, prompts=["a cat"])
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    ctx = mp.start_processes(_load_rank, args=(free_port(), str(model), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=5):  # True once both ranks exited
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("a rank did not finish within 120 s: the group hung")
    first, second = (tmp_path / "0").read_text(), (tmp_path / "1").read_text()
    assert first != "loaded" and second.startswith(f"RuntimeError: rank 0 could not load {model}"), (first, second)
