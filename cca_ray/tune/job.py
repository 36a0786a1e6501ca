"""The main job: CFG baseline, ASHA sweep over λ/β (CCA), baselines, trade-off curves in MLflow.

    python -m cca_ray.tune                        # the embedded demo, end to end
    python -m cca_ray.tune --preset smoke         # a couple of minutes
    ray job submit --working-dir . -- python -m cca_ray.tune --preset emu3-gen-a100 --workdir /mnt/shared/cca_work

Steps (each cached under the workdir, keyed by the config fields that produced it (cca_ray.steps), so a
rerun skips what is done and a changed field recomputes only what depends on it; Ctrl-C stops the job, exit 130):
  1. prepare data and pretrain the base model if missing;
  2. CFG baseline: the base model over eval.cfg_scales (n = eval.num_samples);
  3. ASHA over the tune space (cca_ray/tune_spaces/<preset>.yaml): each trial is a Ray Train CCA run
     (Train inside a Tune trial, named after the trial so it resumes) that reports the FID proxy
     (n = eval.proxy_num_samples, guidance-free) every tune.report_every steps;
  4. every finished trial and the DPO / unlearning baselines (same budget) evaluated guidance-free at n;
  5. optional (tune.extra_methods): a λ-conditioned CCA model scored over eval.lam_values and a GFT model
     over eval.beta_values, λ / β chosen at sampling time (one model, many points);
  6. results table (markdown + CSV), trade-off plot (paper Figure 4), best model registered in the MLflow registry.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from cca_ray import tracking
from cca_ray.config import Config, ConfigError, with_overrides
from cca_ray.evaluate.job import cfg_curve, eval_setup, evaluate_model, proxy_setup
from cca_ray.evaluate.report import format_table, to_csv, trade_off_plot
from cca_ray.models import loader_options
from cca_ray import steps
from cca_ray.steps import step_key
from cca_ray.tune.extra import run_extra_methods
from cca_ray.tune.sweep import finished_export, load_space, run_asha

# -- reporting --------------------------------------------------------------------------
def log_samples(cfg: Config, run_id: str, images, metrics: dict) -> None:
    """A sample grid and the final guidance-free metrics on a trial's child run."""

    grid = tracking.image_grid(images[:100], ncols=10)
    c = tracking.client(cfg.mlflow_uri)
    c.log_image(run_id, grid if grid.shape[-1] == 3 else grid[..., 0], "samples_guidance_free.png")
    tracking.log_metrics(cfg.mlflow_uri, run_id, {f"final_{k}": metrics.get(k) for k in
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


class NoTrialFinished(RuntimeError):
    """Every trial failed or was stopped before the end: nothing to evaluate."""


def no_trial_message(grid, sweep_dir: Path) -> str:
    from cca_ray.tune.sweep import first_trial_error

    return (f"no trial finished ({len(grid)} started, {grid.num_errors} failed), so there is nothing to evaluate.\n"
            f"  The first trial's error, from {first_trial_error(grid)}\n"
            f"  What to do: fix what it names (a missing path, too few resources for train.num_workers x "
            f"train.cpus_per_worker, ...) and rerun the same command: the steps already done under "
            f"{sweep_dir.parent.parent} are reused. Every trial's log is under {sweep_dir / 'asha'}.")


def _trial_eval(cfg: Config, setup, export: Path, run_id: str | None, marker: Path) -> dict:
    """Guidance-free evaluation of one export at eval.num_samples, cached by the export's weights."""
    from cca_ray.data.fingerprint import checkpoint_id

    key = step_key(cfg, ("eval", "sample"), export=checkpoint_id(export))
    m = steps.cached(marker, key)
    if m is None:
        m, imgs = evaluate_model(setup, export, guidance=0.0, n=cfg.eval.num_samples)
        if run_id:
            log_samples(cfg, run_id, imgs, m)
        m = steps.store(marker, key, m)
    return dict(m)


def select_best(points: list[dict], mode: str = "min") -> dict:
    """The finished trial with the best last value of the sweep's metric (the FID proxy: its own seeds and
    train-split reference), never the lowest FID of the final table, which then reports it on samples it
    was not selected on. Marked `(selected)` in the table; it is the registered best model and gives
    λ-conditioned CCA its β."""
    worst = float("inf") if mode == "min" else float("-inf")
    values = [worst if p.get("selection_metric") is None else p["selection_metric"] for p in points]
    best = points[values.index(min(values) if mode == "min" else max(values))]
    best["method"] += " (selected)"
    return best


def run_main_job(cfg: Config) -> dict:
    from cca_ray.data.fingerprint import checkpoint_id
    from cca_ray.train.pretrain import pretrain
    from cca_ray.train.driver import ensure_inputs, ensure_ray, run_training
    from cca_ray.tune.sweep import trial_name, was_interrupted

    t0 = time.time()
    ensure_ray()
    space = load_space(cfg)
    print(f"[1/5 {clock(t0)}] data and base model", flush=True)
    base = pretrain(cfg)  # each keeps its own key: prepared data by its fingerprint, the base model by its config
    ensure_inputs(cfg, "train")
    base_id = checkpoint_id(base)
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
    key = step_key(cfg, ("eval", "sample"), base=base_id)
    cfg_rows = steps.cached(sweep_dir / "cfg_baseline", key)
    if cfg_rows is None:
        cfg_rows = cfg_curve(setup, base, cfg.eval.cfg_scales, n=n)
        for r in cfg_rows:
            r["method"] = "base+CFG"
        cfg_rows = steps.store(sweep_dir / "cfg_baseline", key, cfg_rows)
    else:
        print(f"  reused (same base model and eval settings): {steps.marker_path(sweep_dir / 'cfg_baseline')}",
              flush=True)

    print(f"[3/5 {clock(t0)}] ASHA sweep: {cfg.tune.num_trials} trials over {list(space['params'])}", flush=True)
    # ASHA selects on the proxy: its own seeds and train-split reference, disjoint from the final table's
    grid, trials_dir = run_asha(cfg, proxy_setup(setup), space, sweep_dir, parent, base_id)
    if was_interrupted():
        raise KeyboardInterrupt

    print(f"[4/5 {clock(t0)}] evaluating finished trials and baselines guidance-free (n={n})", flush=True)
    points = []
    exp_id = tracking.experiment_id(uri, cfg.experiment)
    for res in grid:
        name = trial_name(cfg, res.config, base_id)
        export = finished_export(trials_dir / name, cfg.base_model_dir, zero_stage=cfg.train.zero_stage,
                                 dtype=cfg.model.dtype, load_options=loader_options(cfg.model, cfg.base_model_dir))
        if export is None:
            continue  # stopped early by ASHA (or failed): only its proxy history counts
        run_id = tracking.find_run(uri, exp_id, name)
        m = _trial_eval(cfg, setup, export, run_id, trials_dir / name / "eval")
        m.update(method=f"cca {name}", lam=res.config.get("train.lam"), beta=res.config.get("train.beta"),
                 export=str(export), run_id=run_id, selection_metric=(res.metrics or {}).get(space["metric"]))
        points.append(m)
    if not points:
        raise NoTrialFinished(no_trial_message(grid, sweep_dir))
    best = select_best(points, space["mode"])

    def train_baseline(kind: str) -> tuple[str, Config, str]:
        bcfg = with_overrides(cfg, {"train.objective": kind, "train.beta": best["beta"]})
        bkey = step_key(bcfg, ("train", "model", "data", "tokenizer"), base=base_id)
        bname = f"baseline-{kind}-{bkey[:8]}"
        marker = sweep_dir / "baselines" / bname / "export"
        export = steps.cached(marker, bkey)
        if export is None:
            res = run_training(bcfg, "train", run_name=bname, storage_path=sweep_dir / "baselines",
                               parent_run_id=parent)
            export = steps.store(marker, bkey, str(res.export_dir))
        return bname, bcfg, export

    # side by side, as many at a time as the sweep's trials
    with ThreadPoolExecutor(max_workers=max(1, min(len(cfg.tune.baselines), cfg.tune.max_concurrent_trials))) as pool:
        trained = list(pool.map(train_baseline, cfg.tune.baselines))
    for kind, (bname, bcfg, export) in zip(cfg.tune.baselines, trained):
        m = _trial_eval(cfg, setup, Path(export), None, sweep_dir / "baselines" / bname / "eval")
        # the paper sweeps DPO's β and unlearning's λ_u; here they reuse the best trial's β and the default λ_u
        m.update(method=f"{kind} (untuned)", beta=best["beta"] if kind == "dpo" else None,
                 lam=bcfg.train.lam_unlearning if kind == "unlearning" else None)
        points.append(m)
    curves = run_extra_methods(cfg, setup, best, sweep_dir, parent, n, base_id)  # tune.extra_methods: {} by default

    print(f"[5/5 {clock(t0)}] results", flush=True)
    rows = cfg_rows + points + [r for c in curves.values() for r in c]
    table = format_table(rows)
    rkey = steps.digest(rows)
    done = steps.cached(sweep_dir / "results.md", rkey) if (sweep_dir / "results.md").exists() else None
    if done is None:  # logged and registered once per set of results, however often the job reruns
        plot = trade_off_plot(cfg_rows, points, sweep_dir / "trade_off.png", curves=curves)
        (sweep_dir / "results.md").write_text(table + "\n")
        (sweep_dir / "results.csv").write_text(to_csv(rows))
        c = tracking.client(uri)
        c.log_artifact(parent, str(plot))
        c.log_artifact(parent, str(sweep_dir / "results.md"))
        c.log_artifact(parent, str(sweep_dir / "results.csv"))
        for i, r in enumerate(cfg_rows):
            tracking.log_metrics(uri, parent, {f"cfg_{k}": r.get(k) for k in ("fid", "isc_mean", "precision", "recall",
                                                                            "accuracy", "guidance")}, step=i)
        tracking.log_metrics(uri, parent, {f"best_{k}": best.get(k) for k in ("fid", "isc_mean", "precision", "recall",
                                                                            "accuracy")}, step=0)
        model_uri = register_best(cfg, best["run_id"] or parent, Path(best["export"]), f"{cfg.experiment}-best")
        done = steps.store(sweep_dir / "results.md", rkey, {"plot": str(plot), "model_uri": model_uri})
    tracking.end_run(uri, parent)
    summary = {"table": table, "plot": done["plot"], "best": best, "model_uri": done["model_uri"], "cfg_rows": cfg_rows,
               "points": points, "curves": curves, "minutes": (time.time() - t0) / 60}
    print(table)
    print(f"\ntrade-off plot: {done['plot']}\nbest model: {best['export']} (registered as {done['model_uri']})")
    print(f"open MLflow:    mlflow ui --backend-store-uri {uri}")
    print(f"took {summary['minutes']:.1f} min")
    return summary


def main(argv=None) -> None:
    from cca_ray.cli import parse_stage_args

    cfg, _ = parse_stage_args("tune", "The main job: CFG baseline, ASHA sweep over lam/beta, trade-off curves", argv)
    from cca_ray.data.schema import DataError
    from cca_ray.train.batches import TrainDataError
    from cca_ray.train.driver import WorkerStartError

    try:
        run_main_job(cfg)
    except (ConfigError, DataError, TrainDataError, WorkerStartError, NoTrialFinished) as e:
        raise SystemExit(f"cca_ray.tune: error: {e}") from None
    except KeyboardInterrupt:
        print("cca_ray.tune: interrupted; rerun the same command to resume: finished steps are reused and "
              "unfinished trials continue from their last checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
