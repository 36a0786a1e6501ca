"""The sweep: a search space over config fields, one Tune trial = one Ray Train run, ASHA on the FID proxy.

Ray Train V2 runs inside a Tune trial function (Tuner(TorchTrainer) is gone): each trial builds
its TorchTrainer named after the trial's config (trial_name), so a rerun of the sweep resumes every
unfinished trial from its last checkpoint and replays the recorded reports of finished ones; it
reports through TuneReportCallback. Only rank 0's metrics reach Tune.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from cca_ray.config import Config, ConfigError, with_overrides
from cca_ray.fs import write_json_atomic
from cca_ray.steps import step_key
from cca_ray.evaluate.job import EvalSetup, evaluate_model
from cca_ray.models import is_checkpoint
from cca_ray.tune_spaces import SPACE_DIR
from cca_ray.workarounds import free_orphan_placement_groups, wait_for_train_controllers_to_exit

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


# -- the FID proxy, computed during training at every report ---------------------------------
class FidProxy:
    """extra_report_fn for the trainer: guidance-free samples of the current policy -> fid_proxy (and proxy_s,
    its seconds), the same values on every rank.

    `setup` is the proxy's own (evaluate.job.proxy_setup: train-split reference) and the samples use
    eval.proxy_seed, so the final table's seeds and real images are never the ones ASHA selected on.
    Where the images are drawn is eval.proxy_runner (Config.proxy_runs_as_task): in_process, rank 0 samples
    its live weights; task, the ranks write `<run_dir>/proxy_export` together (cca_ray.train.gathered) and
    rank 0 scores Ray tasks' samples of it (GPU tasks under train.use_gpu) while the others wait for the
    result: under ZeRO-3 no rank holds the whole model, so no rank may sample on its own."""

    def __init__(self, setup: EvalSetup):
        self.setup = setup

    def __call__(self, trainer) -> dict:
        from cca_ray.train import gathered

        t0 = time.perf_counter()
        if trainer.cfg.proxy_runs_as_task():  # the trial's own config (its train section)
            path = gathered.export_weights(trainer, self._run_dir(trainer) / gathered.PROXY_EXPORT)
            out = self._score(model_path=path, task_gpus=1.0 if trainer.tc.use_gpu else 0.0) \
                if trainer.rank == 0 else None
        else:
            out = self._score(model=trainer.adapter) if trainer.rank == 0 else None
        if out is not None:
            out["proxy_s"] = time.perf_counter() - t0
        return gathered.broadcast_result(out, trainer.rank)

    @staticmethod
    def _run_dir(trainer) -> Path:
        if trainer.run_dir is None:
            raise ValueError("eval.proxy_runner=task writes the proxy's export into the run dir: give the Trainer "
                             "a run_dir")
        return trainer.run_dir

    def _score(self, model_path=None, **how) -> dict:
        cfg = self.setup.cfg
        m, _ = evaluate_model(self.setup, model_path, guidance=0.0, n=cfg.eval.proxy_num_samples, metrics=("fid",),
                              seed=cfg.eval.proxy_seed, **how)
        return {"fid_proxy": m["fid"], **({"acc_proxy": m["accuracy"]} if "accuracy" in m else {})}


# -- trials: named by what they train, resumed by Ray Train, replayed when recorded ----------------
REPORTS_FILE = "reports.json"  # every report a trial made, in order (what ASHA saw)
FINISHED_FILE = "finished.json"  # the trial trained to the end and exported
FINAL_EVAL_FIELDS = ("num_samples", "cfg_scales", "workers", "lam_values", "beta_values")


def trial_name(cfg: Config, params: dict, base_id: str) -> str:
    """`trial-<hash>` of the sampled params and every config field a trial's training and FID proxy read,
    plus the starting weights: the same trial on a rerun gets the same name (and so its Ray Train run,
    checkpoints and MLflow run); a changed field gives a new trial."""
    tcfg = with_overrides(cfg, params)
    # the proxy reads eval's settings but not those of the final evaluation
    proxy = {k: v for k, v in tcfg.eval.model_dump(mode="json").items() if k not in FINAL_EVAL_FIELDS}
    return "trial-" + step_key(tcfg, ("train", "model", "data", "tokenizer", "sample"), base=base_id, proxy=proxy,
                               report_every=cfg.tune.report_every)[:10]


def read_reports(trial_dir: Path) -> list[dict]:
    try:
        return json.loads((Path(trial_dir) / REPORTS_FILE).read_text())
    except (OSError, ValueError):
        return []


def _tune_report_callback(reports_path: str):
    """TuneReportCallback that first appends each report to reports_path (runs in the Train controller,
    after Ray committed the report's checkpoint)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class RecordingTuneReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            rec = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str, bool)) or v is None}
            write_json_atomic(reports_path, read_reports(Path(reports_path).parent) + [rec])
            super().after_report(run_context, metrics, checkpoint)

    return RecordingTuneReport()


def trial_fn(config: dict, ctx: dict) -> None:
    """One Tune trial = one Ray Train CCA run named by trial_name.

    A rerun of the sweep builds a fresh Tuner whose seeded search suggests the same trials in the same
    order. A trial first replays the reports it recorded, so ASHA takes the decisions it took; a trial
    that finished stops there (nothing is retrained), an unfinished one continues from its last
    checkpoint (Ray Train resumes a run of the same name and storage path)."""
    from ray import tune

    from cca_ray.train.driver import run_training

    base_cfg = Config.model_validate(ctx["cfg"])
    name = trial_name(base_cfg, config, ctx["base_id"])
    trial_dir = Path(ctx["trials_dir"]) / name
    recorded = read_reports(trial_dir)
    for rec in recorded:
        tune.report({k: v for k, v in rec.items() if k != "checkpoint_path"})
    if (trial_dir / FINISHED_FILE).exists():
        print(f"{name}: finished in an earlier run; replayed its {len(recorded)} reports", flush=True)
        return
    if recorded:
        print(f"{name}: replayed {len(recorded)} reports; resuming from its last checkpoint", flush=True)
    cfg = with_overrides(base_cfg, config)
    every = cfg.tune.report_every
    # every report carries the proxy, so ASHA compares like with like at each rung
    # the trial itself holds TRIAL_CPU; its workers give that back so a sweep fits a node exactly
    cpus = cfg.train.cpus_per_worker - TRIAL_CPU / cfg.train.num_workers
    cfg = with_overrides(cfg, {"train.log_every": every, "train.checkpoint_every": every, "train.cpus_per_worker": cpus})
    if cfg.tune.max_concurrent_trials == 1:
        free_orphan_placement_groups(cpus)
    res = run_training(cfg, "train", run_name=name, storage_path=ctx["trials_dir"],
                       callbacks=[_tune_report_callback(str(trial_dir / REPORTS_FILE))],
                       extra_report_fn=FidProxy(ctx["setup"]), extra_report_every=every,
                       parent_run_id=ctx["parent_run_id"])
    write_json_atomic(trial_dir / FINISHED_FILE, {"export": str(res.export_dir), "step": res.metrics.get("step")})


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


def run_asha(cfg: Config, setup: EvalSetup, space: dict, sweep_dir: Path, parent_run_id: str, base_id: str):
    """ASHA over the space; returns (ResultGrid, trials_dir). Every call builds a fresh Tuner (never
    Tuner.restore, which did not honour max_concurrent_trials): the seeded search suggests the same
    trials in the same order and each one replays or resumes itself (trial_fn)."""
    import shutil

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trials_dir = sweep_dir / "trials"
    steps = cfg.train.max_steps or 10**9
    # one rung past the last report: a trial that reaches the end finishes (and exports) on its own
    # instead of being stopped by ASHA at max_t, which would kill it before its export
    max_t = max(1, steps // cfg.tune.report_every) + 1
    ctx = {"cfg": cfg.model_dump(mode="json"), "setup": setup, "trials_dir": str(trials_dir),
           "parent_run_id": parent_run_id, "base_id": base_id}
    # the trial only drives its Ray Train workers: it holds a token CPU
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), {"cpu": TRIAL_CPU})
    exp_dir = sweep_dir / "asha"
    if exp_dir.exists():  # Tune's own bookkeeping of an earlier run; the trials keep theirs in trials_dir
        print(f"  rerun: trials recorded under {trials_dir} are replayed or resumed, not retrained", flush=True)
        shutil.rmtree(exp_dir)
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune_space(space["params"]),
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
        run_config=tune.RunConfig(name="asha", storage_path=str(sweep_dir), stop=_interrupt_stopper()),
    )
    with _sigint_stops_the_sweep():
        grid = tuner.fit()
    # the last trial ASHA stopped may have left its workers' group; after Ctrl-C every trial is stopped, so any
    # group of the trial-worker shape is an orphan whatever tune.max_concurrent_trials is, once the stopped
    # trials' Train controllers are gone (one still dying may register a group: workarounds.py says why it stays)
    if was_interrupted():
        wait_for_train_controllers_to_exit()
    if cfg.tune.max_concurrent_trials == 1 or was_interrupted():
        free_orphan_placement_groups(cfg.train.cpus_per_worker - TRIAL_CPU / cfg.train.num_workers)
    return grid, trials_dir


# -- Ctrl-C: stop every trial (their Train workers and placement groups with them), then say so ----------
_INTERRUPTED = threading.Event()


def _interrupt_stopper():
    """A tune Stopper that ends the experiment once SIGINT arrived."""
    from ray.tune.stopper import Stopper

    class InterruptStopper(Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            from cca_ray.tune.sweep import was_interrupted  # by reference: Tune pickles its stopper

            return was_interrupted()

    return InterruptStopper()


@contextlib.contextmanager
def _sigint_stops_the_sweep():
    """During fit(): the first SIGINT asks Tune to stop every trial (it returns normally, and the job then
    exits 130 through was_interrupted); a second one raises KeyboardInterrupt at once. Tune's own handler
    is off (TUNE_DISABLE_SIGINT_HANDLER): it would end fit() the same way but leave no trace of the interrupt."""
    _INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt
        print("\nSIGINT: stopping the sweep's trials (Ctrl-C again to force)", file=sys.stderr, flush=True)
        _INTERRUPTED.set()

    before_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    before = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if before_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before_env


def was_interrupted() -> bool:
    """Whether the last run_asha ended because of SIGINT (its trials were stopped, not finished)."""
    return _INTERRUPTED.is_set()


def first_trial_error(grid) -> str:
    """The first errored trial's own error: its error file and the message's last line."""
    for res in grid:
        if res.error is not None:
            lines = [ln for ln in str(res.error).strip().splitlines() if ln.strip()]
            where = Path(res.path) / "error.txt" if res.path else "(no trial directory)"
            return f"{where}:\n    {lines[-1] if lines else type(res.error).__name__}"
    return "(no trial recorded an error: every trial was stopped before it finished)"
