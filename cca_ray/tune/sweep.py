"""The sweep: a search space over config fields, one Tune trial = one Ray Train run, ASHA on the FID proxy.

Ray Train V2 runs inside a Tune trial function (Tuner(TorchTrainer) is gone): each trial builds
its TorchTrainer named after the trial id, so a restored sweep resumes every trial from its last
checkpoint, and reports through TuneReportCallback. Only rank 0's metrics reach Tune.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cca_ray.config import Config, ConfigError, with_overrides
from cca_ray.evaluate.job import EvalSetup, evaluate_model
from cca_ray.models import is_checkpoint
from cca_ray.tune_spaces import SPACE_DIR
from cca_ray.workarounds import free_orphan_placement_groups

DISTS = {"loguniform", "uniform", "choice"}
TRIAL_CPU = 0.01  # Tune refuses 0; the trial function only waits on its TorchTrainer


# -- search space -----------------------------------------------------------------------
def load_space(cfg: Config) -> dict:
    """The tune space YAML (tune.space, else the preset's own), validated against the config fields."""
    path = Path(cfg.tune.space) if cfg.tune.space else Path(str(SPACE_DIR / f"{cfg.preset}.yaml"))
    if not path.exists():
        raise ConfigError(f"tune.space: no search space at {path}")
    space = yaml.safe_load(path.read_text()) or {}
    params = space.get("params") or {}
    if not params:
        raise ConfigError(f"{path}: 'params' is empty")
    for key, spec in params.items():
        if not isinstance(spec, dict) or spec.get("type") not in DISTS:
            raise ConfigError(f"{path}: {key}: type must be one of {sorted(DISTS)}")
        with_overrides(cfg, {key: spec["values"][0] if spec["type"] == "choice" else spec["low"]})  # names a field?
    return {"path": str(path), "metric": space.get("metric", "fid_proxy"), "mode": space.get("mode", "min"),
            "params": params}


def to_tune_space(params: dict) -> dict:
    from ray import tune

    out = {}
    for key, spec in params.items():
        if spec["type"] == "loguniform":
            out[key] = tune.loguniform(spec["low"], spec["high"])
        elif spec["type"] == "uniform":
            out[key] = tune.uniform(spec["low"], spec["high"])
        else:
            out[key] = tune.choice(spec["values"])
    return out


# -- the FID proxy, computed on rank 0 inside the training loop ---------------------------
class FidProxy:
    """extra_report_fn for the trainer: guidance-free samples of the current policy -> fid_proxy."""

    def __init__(self, setup: EvalSetup):
        self.setup = setup

    def __call__(self, trainer) -> dict:
        if trainer.rank != 0:
            return {}
        cfg = self.setup.cfg
        m, _ = evaluate_model(self.setup, None, guidance=0.0, n=cfg.eval.proxy_num_samples, metrics=("fid",),
                              model=trainer.adapter)
        return {"fid_proxy": m["fid"], **({"acc_proxy": m["accuracy"]} if "accuracy" in m else {})}


def trial_fn(config: dict, ctx: dict) -> None:
    """One Tune trial = one Ray Train CCA run named after the trial (so a restored sweep resumes it)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cca_ray.train.driver import run_training

    cfg = with_overrides(Config.model_validate(ctx["cfg"]), config)
    every = cfg.tune.report_every
    # every report carries the proxy, so ASHA compares like with like at each rung
    # the trial itself holds TRIAL_CPU; its workers give that back so a sweep fits a node exactly
    cpus = cfg.train.cpus_per_worker - TRIAL_CPU / cfg.train.num_workers
    cfg = with_overrides(cfg, {"train.log_every": every, "train.checkpoint_every": every, "train.cpus_per_worker": cpus})
    if cfg.tune.max_concurrent_trials == 1:
        free_orphan_placement_groups(cpus)
    run_training(cfg, "train", run_name=f"trial-{tune.get_context().get_trial_id()}", storage_path=ctx["trials_dir"],
                 callbacks=[TuneReportCallback()], extra_report_fn=FidProxy(ctx["setup"]), extra_report_every=every,
                 parent_run_id=ctx["parent_run_id"])


def finished_export(trial_dir: Path, model_dir: Path, *, zero_stage: int, dtype: str,
                    load_options: dict | None = None) -> Path | None:
    """The trial's exported model; for a trial that trained to the end but was stopped by ASHA at its
    last report (before the driver's export), export its final checkpoint now. None if it stopped early."""
    from cca_ray.train import checkpoint as ckpt

    export = trial_dir / "export"
    if is_checkpoint(export):
        return export
    states = []
    for d in trial_dir.glob("checkpoint_*"):
        try:
            states.append((ckpt.read_state(d), d))
        except (OSError, ValueError):
            continue  # an incomplete checkpoint directory
    if not states:
        return None
    state, last = max(states, key=lambda s: s[0].get("step", -1))
    if state.get("total_steps") is None or state["step"] < state["total_steps"]:
        return None
    print(f"  {trial_dir.name}: trained to the end, stopped at its last report; exporting {last.name}", flush=True)
    return ckpt.export_model(last, model_dir, export, zero_stage=zero_stage, dtype=dtype, load_options=load_options)


def run_asha(cfg: Config, setup: EvalSetup, space: dict, sweep_dir: Path, parent_run_id: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trials_dir = sweep_dir / "trials"
    steps = cfg.train.max_steps or 10**9
    # one rung past the last report: a trial that reaches the end finishes (and exports) on its own
    # instead of being stopped by ASHA at max_t, which would kill it before its export
    max_t = max(1, steps // cfg.tune.report_every) + 1
    ctx = {"cfg": cfg.model_dump(mode="json"), "setup": setup, "trials_dir": str(trials_dir),
           "parent_run_id": parent_run_id}
    # the trial only drives its Ray Train workers: it holds a token CPU
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), {"cpu": TRIAL_CPU})
    param_space = to_tune_space(space["params"])
    exp_dir = sweep_dir / "asha"
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"resuming the sweep at {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, param_space=param_space, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=space["metric"], mode=space["mode"], num_samples=cfg.tune.num_trials,
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=cfg.tune.grace_period,
                                        reduction_factor=cfg.tune.reduction_factor),
                # max_concurrent on the generator itself: Tune does not apply max_concurrent_trials to a
                # search_alg passed in, and two Train runs on one small node starve each other
                search_alg=tune.search.BasicVariantGenerator(random_state=cfg.tune.seed,
                                                             max_concurrent=cfg.tune.max_concurrent_trials),
            ),
            run_config=tune.RunConfig(name="asha", storage_path=str(sweep_dir)),
        )
    return tuner.fit(), trials_dir
