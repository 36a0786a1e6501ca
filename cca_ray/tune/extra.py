"""The main job's optional methods whose knob is chosen at sampling time (tune.extra_methods).

λ-conditioned CCA (train.lam_sampling=loguniform) and GFT (train.objective=gft) each train one model
with the trials' budget; each is then scored guidance-free at many values of its knob (eval.lam_values,
eval.beta_values), which draws a curve on the trade-off plot beside the base model's CFG curve.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cca_ray.config import Config, with_overrides
from cca_ray.evaluate.job import knob_curve

# the optional methods whose knob is chosen at sampling time (tune.extra_methods): one model each
EXTRA_METHODS = {"lam_conditioned": ("λ-conditioned CCA", {"train.lam_sampling": "loguniform"}),
                 "gft": ("GFT", {"train.objective": "gft"})}


def run_extra_methods(cfg: Config, setup, best: dict, sweep_dir: Path, parent: str, n: int,
                      base_id: str) -> dict[str, list[dict]]:
    """Train each of tune.extra_methods (λ-conditioned CCA at the best trial's β; GFT) with the trials' budget,
    then score it at many knob values: {method: rows} for the trade-off plot and the table. Both steps are
    cached like the baselines (cca_ray.steps): a rerun with the same fields trains and scores nothing."""
    from cca_ray import steps, tracking
    from cca_ray.data.fingerprint import checkpoint_id
    from cca_ray.train.driver import run_training

    todo = []  # (method, label, its config, its step key, its name)
    for method in cfg.tune.extra_methods:
        label, over = EXTRA_METHODS[method]
        mcfg = with_overrides(cfg, {**over, **({"train.beta": best["beta"]} if method == "lam_conditioned" else {})})
        tkey = steps.step_key(mcfg, ("train", "model", "data", "tokenizer"), base=base_id)
        todo.append((method, label, mcfg, tkey, f"extra-{method}-{tkey[:8]}"))

    def train(job) -> str:
        method, label, mcfg, tkey, name = job
        export = steps.cached(sweep_dir / "extra" / name / "export", tkey)
        if export is None:
            print(f"[extra] {label}: training one model whose knob is chosen at sampling time", flush=True)
            res = run_training(mcfg, "train", run_name=name, storage_path=sweep_dir / "extra", parent_run_id=parent)
            export = steps.store(sweep_dir / "extra" / name / "export", tkey, str(res.export_dir))
        return export

    # the models train side by side, as many at a time as the sweep's trials (tune.max_concurrent_trials)
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), cfg.tune.max_concurrent_trials))) as pool:
        exports = list(pool.map(train, todo))

    curves = {}
    for (method, label, _, _, name), export in zip(todo, exports):
        print(f"[extra] {label}: scored at each knob value (n={n})", flush=True)
        ekey = steps.step_key(cfg, ("eval", "sample"), export=checkpoint_id(export))
        rows = steps.cached(sweep_dir / "extra" / name / "curve", ekey)
        if rows is None:
            rows = knob_curve(setup, Path(export), n=n)
            for i, r in enumerate(rows):
                r.update(method=label, export=str(export))
                tracking.log_metrics(cfg.mlflow_uri, parent, {f"{method}_{k}": r.get(k) for k in
                                                              ("fid", "isc_mean", "precision", "recall", "accuracy",
                                                               "lam", "beta")}, step=i)
            rows = steps.store(sweep_dir / "extra" / name / "curve", ekey, rows)
        else:
            print(f"  reused: {steps.marker_path(sweep_dir / 'extra' / name / 'curve')}", flush=True)
        curves[method] = rows
    return curves
