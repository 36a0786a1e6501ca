"""The main job: CFG baseline, ASHA sweep over λ/β (CCA), baselines, trade-off curves in MLflow.

    python -m cca_ray.tune                        # the embedded demo, end to end
    python -m cca_ray.tune --preset smoke         # a couple of minutes
    ray job submit --working-dir . -- python -m cca_ray.tune --preset emu3-gen-a100 --workdir /mnt/shared/cca_work

Steps (each skipped when its output already exists, so an interrupted job picks up where it stopped):
  1. prepare data and pretrain the base model if missing;
  2. CFG baseline: the base model over eval.cfg_scales (n = eval.num_samples);
  3. ASHA over the tune space (cca_ray/tune_spaces/<preset>.yaml): each trial is a Ray Train CCA run
     (Train inside a Tune trial, named after the trial so it resumes) that reports the FID proxy
     (n = eval.proxy_num_samples, guidance-free) every tune.report_every steps;
  4. every finished trial and the DPO / unlearning baselines (same budget) evaluated guidance-free at n;
  5. results table (markdown + CSV), trade-off plot, best model registered in the MLflow registry.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import yaml

from cca_ray import tracking
from cca_ray.config import PRESET_DIR, Config, ConfigError, with_overrides
from cca_ray.evaluate import EvalSetup, TABLE_COLUMNS, cfg_curve, eval_setup, evaluate_model, format_table

SPACE_DIR = PRESET_DIR.parent / "tune_spaces"
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
        return {"fid_proxy": m["fid"], "acc_proxy": m["accuracy"]}


def trial_fn(config: dict, ctx: dict) -> None:
    """One Tune trial = one Ray Train CCA run named after the trial (so a restored sweep resumes it)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cca_ray.train import run_training

    cfg = with_overrides(Config.model_validate(ctx["cfg"]), config)
    every = cfg.tune.report_every
    # every report carries the proxy, so ASHA compares like with like at each rung
    # the trial itself holds TRIAL_CPU; its workers give that back so a sweep fits a node exactly
    cpus = cfg.train.cpus_per_worker - TRIAL_CPU / cfg.train.num_workers
    cfg = with_overrides(cfg, {"train.log_every": every, "train.checkpoint_every": every, "train.cpus_per_worker": cpus})
    if cfg.tune.max_concurrent_trials == 1:
        remove_orphan_worker_groups(cpus)
    run_training(cfg, "train", run_name=f"trial-{tune.get_context().get_trial_id()}", storage_path=ctx["trials_dir"],
                 callbacks=[TuneReportCallback()], extra_report_fn=FidProxy(ctx["setup"]), extra_report_every=every,
                 parent_run_id=ctx["parent_run_id"])


def remove_orphan_worker_groups(bundle_cpu: float) -> int:
    """Free worker placement groups left behind by trials that ASHA stopped.

    Ray Train's own PlacementGroupCleaner does this, but it gives up when it cannot reach the
    state API (seen with more than one Ray instance on a machine), and the next trial then waits
    forever for CPUs. Only called when one trial runs at a time: then no live trial owns a
    placement group of the trial-worker shape, so every such group is an orphan.
    """
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    for pg_id, info in placement_group_table().items():
        bundles = list(info.get("bundles", {}).values())
        if info.get("state") == "CREATED" and bundles and all(b.get("CPU") == bundle_cpu for b in bundles):
            from ray._raylet import PlacementGroupID

            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    if removed:
        print(f"freed {removed} placement group(s) left by stopped trials", flush=True)
    return removed


def finished_export(trial_dir: Path, model_dir: Path, *, zero_stage: int, dtype: str) -> Path | None:
    """The trial's exported model; for a trial that trained to the end but was stopped by ASHA at its
    last report (before the driver's export), export its final checkpoint now. None if it stopped early."""
    from cca_ray import checkpoint as ckpt

    export = trial_dir / "export"
    if (export / "config.json").exists():
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
    return ckpt.export_model(last, model_dir, export, zero_stage=zero_stage, dtype=dtype)


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


# -- reporting --------------------------------------------------------------------------
def trade_off_plot(cfg_rows: list[dict], points: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (x, y) in zip(axes, [("isc_mean", "fid"), ("recall", "precision")]):
        ax.plot([r[x] for r in cfg_rows], [r[y] for r in cfg_rows], "o-", color="tab:gray", label="base + CFG (scale)")
        for r in cfg_rows:
            ax.annotate(f"s={r['guidance']:g}", (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        styles = {"cca": ("tab:red", "*"), "dpo": ("tab:blue", "s"), "unlearning": ("tab:green", "^")}
        for method, (color, marker) in styles.items():
            pts = [p for p in points if p["method"].startswith(method)]
            if pts:
                ax.scatter([p[x] for p in pts], [p[y] for p in pts], c=color, marker=marker, s=60,
                           label=f"{method}, guidance-free")
            for p in pts:
                label = ",".join(f"{sym}={p[k]:.2g}" for sym, k in (("λ", "lam"), ("β", "beta")) if p.get(k) is not None)
                ax.annotate(label, (p[x], p[y]), fontsize=6, xytext=(3, -8), textcoords="offset points", color=color)
        ax.set_xlabel({"isc_mean": "Inception Score (extractor)", "recall": "recall"}[x])
        ax.set_ylabel({"fid": "FID (lower is better)", "precision": "precision"}[y])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("CCA without guidance vs the base model with CFG")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def log_samples(cfg: Config, run_id: str, images, metrics: dict) -> None:
    """A sample grid and the final guidance-free metrics on a trial's child run."""
    from cca_ray.sampling_jobs import image_grid

    grid = image_grid(images[:100])
    c = tracking.client(cfg.mlflow_uri)
    c.log_image(run_id, grid if grid.shape[-1] == 3 else grid[..., 0], "samples_guidance_free.png")
    tracking.log_metrics(cfg.mlflow_uri, run_id, {f"final_{k}": metrics[k] for k in
                                                  ("fid", "isc_mean", "kid_mean", "precision", "recall", "accuracy")},
                         step=0)


def register_best(cfg: Config, run_id: str, export_dir: Path, name: str) -> str:
    """Log the best export as the run's `model` artifact and register it; returns models:/name/version."""
    c = tracking.client(cfg.mlflow_uri)
    c.log_artifacts(run_id, str(export_dir), "model")
    try:
        c.create_registered_model(name)
    except Exception:  # already registered by an earlier sweep
        pass
    source = f"{c.get_run(run_id).info.artifact_uri}/model"
    mv = c.create_model_version(name, source, run_id=run_id)
    return f"models:/{name}/{mv.version}"


# -- the job ----------------------------------------------------------------------------
def clock(t0: float) -> str:
    """Elapsed time since t0 as m:ss, for the stage lines."""
    m, sec = divmod(int(time.time() - t0), 60)
    return f"{m}:{sec:02d}"


def run_main_job(cfg: Config) -> dict:
    from cca_ray.pretrain import pretrain
    from cca_ray.train import ensure_inputs, ensure_ray, run_training

    t0 = time.time()
    ensure_ray()
    space = load_space(cfg)
    print(f"[1/5 {clock(t0)}] data and base model", flush=True)
    base = pretrain(cfg)
    ensure_inputs(cfg, "train")
    setup = eval_setup(cfg)
    sweep_dir = cfg.root / "sweeps" / cfg.preset
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.mlflow_uri
    parent = tracking.start_run(uri, cfg.experiment, f"sweep-{cfg.preset}", artifact_root=cfg.root / "mlartifacts",
                                tags={"stage": "tune", "space": space["path"]})
    tracking.log_params(uri, parent, {f"space.{k}": json.dumps(v) for k, v in space["params"].items()})
    tracking.log_text(uri, parent, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")

    n = cfg.eval.num_samples
    print(f"[2/5 {clock(t0)}] CFG baseline of the base model at scales {cfg.eval.cfg_scales} (n={n})", flush=True)
    cfg_rows = cfg_curve(setup, base, cfg.eval.cfg_scales, n=n)
    for r in cfg_rows:
        r["method"] = "base+CFG"

    print(f"[3/5 {clock(t0)}] ASHA sweep: {cfg.tune.num_trials} trials over {list(space['params'])}", flush=True)
    grid, trials_dir = run_asha(cfg, setup, space, sweep_dir, parent)

    print(f"[4/5 {clock(t0)}] evaluating finished trials and baselines guidance-free (n={n})", flush=True)
    points = []
    exp_id = tracking.experiment_id(uri, cfg.experiment)
    for res in grid:
        trial_id = (res.metrics or {}).get("trial_id")
        export = finished_export(trials_dir / f"trial-{trial_id}", cfg.base_model_dir, zero_stage=cfg.train.zero_stage,
                                 dtype=cfg.model.dtype) if trial_id else None
        if export is None:
            continue  # stopped early by ASHA (or failed): only its proxy history counts
        m, imgs = evaluate_model(setup, export, guidance=0.0, n=n)
        m.update(method=f"cca trial-{trial_id}", lam=res.config.get("train.lam"), beta=res.config.get("train.beta"),
                 export=str(export), run_id=tracking.find_run(uri, exp_id, f"trial-{trial_id}"))
        if m["run_id"]:
            log_samples(cfg, m["run_id"], imgs, m)
        points.append(m)
    if not points:
        raise RuntimeError("no trial finished; nothing to evaluate (see the Tune logs above)")
    best = min(points, key=lambda p: p["fid"])
    for kind in cfg.tune.baselines:
        bcfg = with_overrides(cfg, {"train.objective": kind, "train.beta": best["beta"]})
        res = run_training(bcfg, "train", run_name=f"baseline-{kind}", storage_path=sweep_dir / "baselines",
                           parent_run_id=parent)
        m, _ = evaluate_model(setup, res.export_dir, guidance=0.0, n=n)
        m.update(method=kind, beta=best["beta"] if kind == "dpo" else None,
                 lam=bcfg.train.lam_unlearning if kind == "unlearning" else None)
        points.append(m)

    print(f"[5/5 {clock(t0)}] results", flush=True)
    rows = cfg_rows + points
    table = format_table(rows)
    plot = trade_off_plot(cfg_rows, points, sweep_dir / "trade_off.png")
    (sweep_dir / "results.md").write_text(table + "\n")
    (sweep_dir / "results.csv").write_text(to_csv(rows))
    c = tracking.client(uri)
    c.log_artifact(parent, str(plot))
    c.log_artifact(parent, str(sweep_dir / "results.md"))
    c.log_artifact(parent, str(sweep_dir / "results.csv"))
    for i, r in enumerate(cfg_rows):
        tracking.log_metrics(uri, parent, {f"cfg_{k}": r[k] for k in ("fid", "isc_mean", "precision", "recall",
                                                                        "accuracy", "guidance")}, step=i)
    tracking.log_metrics(uri, parent, {f"best_{k}": best[k] for k in ("fid", "isc_mean", "precision", "recall",
                                                                        "accuracy")}, step=0)
    model_uri = register_best(cfg, best["run_id"] or parent, Path(best["export"]), f"{cfg.experiment}-best")
    tracking.end_run(uri, parent)
    summary = {"table": table, "plot": str(plot), "best": best, "model_uri": model_uri, "cfg_rows": cfg_rows,
               "points": points, "minutes": (time.time() - t0) / 60}
    print(table)
    print(f"\ntrade-off plot: {plot}\nbest model: {best['export']} (registered as {model_uri})")
    print(f"open MLflow:    mlflow ui --backend-store-uri {uri}")
    print(f"took {summary['minutes']:.1f} min")
    return summary


def main(argv=None) -> None:
    from cca_ray.cli import parse_stage_args

    cfg, _ = parse_stage_args("tune", "The main job: CFG baseline, ASHA sweep over lam/beta, trade-off curves", argv)
    try:
        run_main_job(cfg)
    except ConfigError as e:
        raise SystemExit(f"cca_ray.tune: error: {e}") from None


if __name__ == "__main__":
    main()
