"""MLflow helpers: one experiment per config, one run per training run, parent/child runs for sweeps.

Everything goes through an explicit tracking URI (``cfg.mlflow_uri``: a sqlite store under the
workdir unless MLFLOW_TRACKING_URI is set) and an explicit run id, never through mlflow's global
"active run", so a driver can create a run and a Ray worker can log into it.

A run is found again by its ``cca_ray.run_name`` tag: a training run restarted under the same
name (Ray Train resumes it from its last checkpoint) keeps logging into the same MLflow run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_NAME_TAG = "cca_ray.run_name"
PARENT_TAG = "mlflow.parentRunId"
_BATCH = 100  # MLflow's log_batch limit on params per call


def client(uri: str):
    """A client of the store at `uri`, its model registry included (MLFLOW_REGISTRY_URI if set): never
    the process-global registry URI, which an earlier mlflow.set_registry_uri may have pointed elsewhere."""
    import os

    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def experiment_id(uri: str, name: str, artifact_root: str | Path | None = None) -> str:
    """Get or create the experiment `name`; new experiments keep artifacts under artifact_root."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between the two calls
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, exp_id: str, run_name: str) -> str | None:
    """The newest run tagged with run_name, or None."""
    runs = client(uri).search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_run(uri: str, experiment: str, run_name: str, *, artifact_root: str | Path | None = None,
              parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """Create the run `run_name` (a child of parent_run_id if given), or reopen the one that exists."""
    c = client(uri)
    exp_id = experiment_id(uri, experiment, artifact_root)
    run_id = find_run(uri, exp_id, run_name)
    if run_id is not None:
        c.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return c.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params once; a resumed run re-logging the same values is fine (MLflow accepts equal values)."""
    from mlflow.entities import Param

    c = client(uri)
    existing = c.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), _BATCH):
        c.log_batch(run_id, params=items[i : i + _BATCH])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log finite scalar metrics at `step` (NaN means "no data this window" and is skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if items:
        client(uri).log_batch(run_id, metrics=items)


STEP_KEY = "logged_step"  # logged with every metric batch: the history's own record of which steps it holds


def last_logged_step(uri: str, run_id: str) -> int:
    """The highest step any metric batch was logged at (STEP_KEY's history), -1 for none."""
    steps = [m.step for m in client(uri).get_metric_history(run_id, STEP_KEY)]
    return max(steps, default=-1)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of one metric, in logging order (tests, reports)."""
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def image_grid(images, ncols: int | None = None):
    """uint8 [N, H, W, C] -> one uint8 [rows*H, ncols*W, C] contact sheet (blank cells are 0), for image artifacts.
    ncols defaults to a square-ish sheet."""
    import numpy as np

    n, h, w, c = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    out = np.zeros((nrows * h, ncols * w, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return out
