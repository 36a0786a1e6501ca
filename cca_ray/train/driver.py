"""Stage `train` (and the engine of `pretrain`): Ray Train workers, each running a cca_ray.train.recipe.Trainer.

    python -m cca_ray.train --preset smoke --workdir DIR            # CCA from DIR/models/base
    python -m cca_ray.pretrain --preset smoke --workdir DIR         # same trainer, objective sft

`run_training` is the entry Tune calls too: a TorchTrainer of `train.num_workers` workers
(gloo on CPU, NCCL on GPU), named after the run so that the same name resumes it. Every
`log_every` steps the all-reduced metrics go to MLflow (rank 0, into the run the driver
created), to Prometheus gauges (rank 0, cca_ray.telemetry over ray.util.metrics) and to
`ray.train.report` (every rank; Tune's TuneReportCallback forwards rank 0's).
A checkpoint is a sharded DeepSpeed checkpoint that each rank writes into its own temp dir
and reports; Ray merges them. The step counter is the data position, so a restarted worker
group (FailureConfig) resumes at the next unseen batch. At the last step the workers write the
`load_model`-able export <checkpoint_dir>/<run>/export from their gathered weights
(cca_ray.train.gathered); the driver keeps it, or consolidates the last checkpoint when the
export does not hold that checkpoint's step (final_export).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cca_ray.train import checkpoint as ckpt
from cca_ray import tracking
from cca_ray.config import Config, ConfigError, TrainConfig, dump_config, flat_params
from cca_ray.models import condition_kind
from cca_ray.data.shards import read_manifest
from cca_ray.raycluster import ensure_ray
from cca_ray.train.batches import PAIRED_OBJECTIVES, REFERENCE_OBJECTIVES, TrainDataError, dataset_for, read_rows
from cca_ray.train.recipe import Trainer
from cca_ray.train.stream import StreamedRows
from cca_ray.workarounds import is_worker_start_timeout, quiet_ray_train_reports
from cca_ray.models import is_checkpoint, loader_options

log = logging.getLogger("cca_ray.train")
# how often Ray Train's controller polls its workers: a SIGKILLed worker is noticed within this
HEALTH_CHECK_INTERVAL_S = "0.5"


class WorkerStartError(RuntimeError):
    """The worker group could not get its resources within train.start_retries + 1 tries."""


def worker_start_message(run_name: str, tc: TrainConfig, tries: int, cluster: dict, available: dict) -> str:
    """What the run asked for, what the cluster has, and what to change."""
    ask = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}

    def show(res: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU", "memory") or
                         k.startswith("accelerator")) or "nothing"

    return (f"{run_name}: could not start {tc.num_workers} Ray Train workers x {{{show(ask)}}} "
            f"({tries} tries of {tc.start_timeout_s:g} s each). The cluster has {show(cluster)}, of which "
            f"{show(available)} is free. Lower train.num_workers or train.cpus_per_worker, free the cluster, or "
            "add nodes; train.start_timeout_s and train.start_retries set how long it waits.")


def default_run_name(cfg: Config, section: str, model_id: str) -> str:
    """`<section>-<objective>-<hash of config + starting weights>`: rerunning the same command on the same
    starting model resumes that run; another config or a retrained base model starts a new one.
    train.data_loading is left out: streamed and in-memory runs see the same batches, so either resumes the other."""
    tc = getattr(cfg, section)
    key = {k: cfg.model_dump(mode="json")[k] for k in (section, "model", "data", "tokenizer")}
    del key[section]["data_loading"]
    key["model_id"] = model_id
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{section}-{tc.objective}-{digest}"


# -- Ray Train worker entry ---------------------------------------------------------------
def _ray_report(metrics: dict, ckpt_dir: str | None) -> None:
    import ray.train

    if ckpt_dir is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                         checkpoint_dir_name=f"checkpoint_{int(metrics['step']):06d}")


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    quiet_ray_train_reports()
    cfg = Config.model_validate(config["cfg"])
    section = config["section"]
    tc = getattr(cfg, section)
    if not tc.use_gpu:
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    ctx = ray.train.get_context()
    rows = StreamedRows if tc.data_loading == "stream" else read_rows  # stream: only the next steps' rows
    data = rows(config["data_dir"], pairs=tc.objective in PAIRED_OBJECTIVES,
                reference=tc.objective in REFERENCE_OBJECTIVES and tc.reference == "precomputed",
                condition_kind=condition_kind(cfg.model.family))
    trainer = Trainer(cfg, section, model_dir=config["model_dir"], data=data, rank=ctx.get_world_rank(),
                      world_size=ctx.get_world_size(), run_dir=config["run_dir"], mlflow=config["mlflow"],
                      report=_ray_report, extra_report_fn=config.get("extra_report_fn"),
                      extra_report_every=config.get("extra_report_every"), run_name=config.get("run_name"),
                      export_at_end=config.get("export", False))
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            trainer.setup(resume_dir=d)
    else:
        trainer.setup()
    if ctx.get_world_rank() == 0:
        log.info("[%s] %s on %d workers, ZeRO-%d, %s; %d steps of %d rows; %s; %s", section, tc.objective,
                 ctx.get_world_size(), tc.zero_stage, f"resuming at step {trainer.step}" if resume else "fresh",
                 trainer.total_steps, trainer.plan.global_batch, trainer.precision, trainer.load_mode)
    trainer.train()
    trainer.cleanup()


# -- driver -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint: Path | None
    export_dir: Path | None
    metrics: dict
    mlflow_run_id: str


def run_training(cfg: Config, section: str = "train", *, run_name: str | None = None,
                 storage_path: str | Path | None = None, model_dir: str | Path | None = None,
                 callbacks: list | None = None, extra_report_fn: Callable[[Trainer], dict] | None = None,
                 extra_report_every: int | None = None, parent_run_id: str | None = None,
                 export: bool = True) -> TrainResult:
    """Run (or resume: same run_name and storage_path) one training run on Ray Train; export the result.

    Usable inside a Tune trial: pass callbacks=[TuneReportCallback()], a run_name from the trial id,
    parent_run_id for the sweep's MLflow parent run and extra_report_fn for FID-proxy reports.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc: TrainConfig = getattr(cfg, section)
    model_dir = Path(model_dir or cfg.base_model_dir).resolve()
    if not is_checkpoint(model_dir):
        raise ConfigError(f"no model checkpoint at {model_dir}; run `python -m cca_ray.pretrain` first "
                          "or set model.path to a local checkpoint")
    data_dir = cfg.data_dir / dataset_for(tc.objective, tc.reference)
    read_manifest(data_dir)  # fail here, not in every worker, if the dataset is missing
    if tc.objective in REFERENCE_OBJECTIVES and tc.reference == "precomputed":
        from cca_ray.train.reference import verify_reference

        verify_reference(data_dir, model_dir, pairs_dir=cfg.data_dir / "pairs", need_null=tc.objective == "cca_cfg")
    if run_name is None:
        from cca_ray.data.fingerprint import checkpoint_id

        run_name = default_run_name(cfg, section, checkpoint_id(model_dir))
    storage = Path(storage_path or cfg.checkpoint_dir).resolve()
    run_dir = storage / run_name
    uri = cfg.mlflow_uri
    run_id = tracking.start_run(uri, cfg.experiment, run_name, artifact_root=cfg.root / "mlartifacts",
                                parent_run_id=parent_run_id, tags={"stage": section, "objective": tc.objective})
    tracking.log_params(uri, run_id, {**flat_params(cfg, (section, "model")), "model_dir": str(model_dir),
                                      "data_dir": str(data_dir)})
    tracking.log_text(uri, run_id, dump_config(cfg), "config.yaml")

    ensure_ray()
    import os

    # read by Ray Train's controller (it propagates these to its actor); start-up tries are bounded below
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(tc.start_timeout_s)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    dumped = cfg.model_dump(mode="json")
    dumped["workdir"] = str(cfg.root)  # workers may start in another cwd
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dumped, "section": section, "model_dir": str(model_dir), "data_dir": str(data_dir),
                           "run_dir": str(run_dir), "run_name": run_name, "mlflow": (uri, run_id),
                           "extra_report_fn": extra_report_fn, "extra_report_every": extra_report_every,
                           "export": export},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=str(storage), callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                             # worker-group start-up timeouts count as controller failures in Train V2
                             failure_config=FailureConfig(max_failures=tc.max_failures,
                                                          controller_failure_limit=tc.start_retries)),
    )
    try:
        result = trainer.fit()
    except BaseException as e:
        tracking.end_run(uri, run_id, "FAILED")
        if is_worker_start_timeout(e):
            import ray

            raise WorkerStartError(worker_start_message(run_name, tc, tc.start_retries + 1, ray.cluster_resources(),
                                                        ray.available_resources())) from None
        raise
    last = Path(result.checkpoint.path) if result.checkpoint is not None else None
    export_dir = None
    if export and last is not None:
        export_dir = final_export(cfg, tc, last, model_dir, run_dir)
        tracking.set_tags(uri, run_id, {"export_dir": export_dir, "checkpoint": last})
    tracking.end_run(uri, run_id, "FINISHED")
    return TrainResult(run_name, run_dir, last, export_dir, dict(result.metrics or {}), run_id)


def final_export(cfg: Config, tc: TrainConfig, last: Path, model_dir: Path, run_dir: Path) -> Path:
    """The run's export: the one the workers wrote at the last step when it holds the final checkpoint's step;
    otherwise (a run resumed from a checkpoint past which nothing was exported, a bf16 run exported as
    float32) this process consolidates the checkpoint's shards, which at Emu3-Gen scale takes ~70 GB."""
    from cca_ray.train.gathered import FINAL_EXPORT, reusable_export

    written = reusable_export(run_dir, int(ckpt.read_state(last)["step"]))
    if written is not None:
        return written
    log.info("consolidating %s into %s (no workers' export of its step)", last, run_dir / FINAL_EXPORT)
    return ckpt.export_model(last, model_dir, run_dir / FINAL_EXPORT, zero_stage=tc.zero_stage,
                             dtype=cfg.model.dtype, load_options=loader_options(cfg.model, model_dir))


def ensure_inputs(cfg: Config, section: str) -> None:
    """What a stage run needs besides the base model: prepared data and, for a precomputed
    reference, pairs_ref scored by this base model (the reference pass runs when it is missing or stale)."""
    from cca_ray.train.reference import ReferenceMismatchError, reference_pass, verify_reference
    from cca_ray.data.schema import DataError
    from cca_ray.data.prepare import prepare

    prepare(cfg)  # no-op when data_dir already holds this config's data
    tc = getattr(cfg, section)
    if tc.objective in REFERENCE_OBJECTIVES and tc.reference == "precomputed":
        if not is_checkpoint(cfg.base_model_dir):
            return  # run_training names the missing base model
        try:
            verify_reference(cfg.data_dir / "pairs_ref", cfg.base_model_dir, pairs_dir=cfg.data_dir / "pairs",
                             need_null=tc.objective == "cca_cfg")
        except (ReferenceMismatchError, DataError) as e:
            print(f"scoring the pairs with the base model now, since pairs_ref is not usable: {e}", flush=True)
            reference_pass(cfg, cfg.base_model_dir, score_null=tc.objective == "cca_cfg")


def main(argv=None) -> None:
    from cca_ray.cli import parse_stage_args

    cfg, args = parse_stage_args(
        "train", "CCA fine-tuning (or dpo/unlearning/sft via train.objective) on Ray Train + DeepSpeed", argv,
        lambda p: p.add_argument("--run-name", help="run to create or resume (default: derived from the config)"))
    from cca_ray.data.schema import DataError

    try:
        ensure_ray()  # before prepare(), which would otherwise start Ray its own way
        ensure_inputs(cfg, "train")
        res = run_training(cfg, "train", run_name=args.run_name)
    except (ConfigError, TrainDataError, DataError, WorkerStartError) as e:
        raise SystemExit(f"cca_ray.train: error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("cca_ray.train: interrupted; rerun the same command to resume from the last "
                         "checkpoint") from None
    print(f"run {res.run_name}: step {res.metrics.get('step')} loss {res.metrics.get('loss')}\n"
          f"  checkpoint {res.checkpoint}\n  export     {res.export_dir}\n  mlflow run {res.mlflow_run_id}")


if __name__ == "__main__":
    main()
