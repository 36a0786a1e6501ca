"""Where `cca_ray.serve` gets what it serves, and where it logs what it served.

The model checkpoint (a local dir or an MLflow URI), the image tokenizer that turns codes into
pixels, the class label -> prompt map of class-conditional datasets, and the opt-in MLflow
log of generated images (one grid per batch in an evaluation run). No Ray here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cca_ray.config import Config
from cca_ray.serve.api import SamplingKey
from cca_ray.tracking import image_grid
from cca_ray.models import is_checkpoint

log = logging.getLogger("cca_ray.serve")

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
SIDECAR = "cca_ray.json"  # written next to every model checkpoint (cca_ray.models.emu3.adapter)


# -- where the model, tokenizer and class prompts come from -------------------------------------
def find_model_dir(root: Path) -> Path:
    """root itself if it is a checkpoint dir, else the shallowest dir below it holding one."""
    if is_checkpoint(root):
        return root
    for name in (SIDECAR, "config.json"):
        found = sorted((p for p in root.rglob(name) if not _hidden(p, root)), key=lambda p: len(p.parts))
        if found:
            return found[0].parent
    raise FileNotFoundError(f"no model checkpoint (config.json) in {root}")


def _hidden(path: Path, root: Path) -> bool:
    """Inside a dot-dir below root: exports are written to `.name.tmp-*` and renamed when complete."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_checkpoint(spec: str, mlflow_uri: str) -> Path:
    """A local dir, or an MLflow URI downloaded to a temp dir -> the local checkpoint dir."""
    if spec.startswith(MLFLOW_SCHEMES):
        import mlflow
        import mlflow.artifacts

        dst = tempfile.mkdtemp(prefix="cca_serve_model_")
        # models:/ URIs are looked up in the *global* registry URI whatever the arguments say.
        # set_*_uri also writes MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, which
        # every later cfg.mlflow_uri would then obey: restore the environment exactly as it was.
        env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
        saved_env = {k: os.environ.get(k) for k in env_keys}
        before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.set_registry_uri(mlflow_uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=dst)
        finally:
            mlflow.set_tracking_uri(before[0])
            mlflow.set_registry_uri(before[1])
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return find_model_dir(Path(local))
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"serve.checkpoint: {path} does not exist")
    return find_model_dir(path)


def default_checkpoint(cfg: Config) -> Path:
    """What a preset produces: the newest consolidated export under checkpoint_dir, else the base model."""
    exports = [p for p in cfg.checkpoint_dir.rglob(SIDECAR) if not _hidden(p, cfg.checkpoint_dir)]
    if exports:
        return max(exports, key=lambda p: p.stat().st_mtime).parent
    if is_checkpoint(cfg.base_model_dir):
        return cfg.base_model_dir
    raise FileNotFoundError(
        f"no model to serve: no export under {cfg.checkpoint_dir} and no base model at {cfg.base_model_dir}; "
        "run `python -m cca_ray.tune` (or pretrain/train) first, or pass --checkpoint PATH"
    )


def find_tokenizer_dir(cfg: Config, model_dir: Path) -> Path:
    """serve.tokenizer_dir, else a `tokenizer/` next to (or inside) the checkpoint, else data_dir/tokenizer."""
    if cfg.serve.tokenizer_dir:
        path = Path(cfg.serve.tokenizer_dir).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"serve.tokenizer_dir: {path} is not a directory")
        return path
    candidates = [model_dir / "image_tokenizer", model_dir / "tokenizer", model_dir.parent / "tokenizer",
                  cfg.data_dir / "tokenizer"]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError("no image tokenizer found (looked in " + ", ".join(map(str, candidates))
                            + "); set serve.tokenizer_dir or pass --tokenizer DIR")


def load_label_prompts(cfg: Config) -> dict[int, str]:
    """class label -> the dataset's prompt for it; {} for a model without classes.

    From serve.label_source (a JSON {label: prompt} file or a dataset dir), else the
    prepared holdout shards, else the train shards.
    """
    import pyarrow.parquet as pq

    if cfg.serve.label_source:
        sources = [Path(cfg.serve.label_source).expanduser().resolve()]
        if not sources[0].exists():
            raise FileNotFoundError(f"serve.label_source: {sources[0]} does not exist")
    else:
        sources = [cfg.data_dir / "holdout", cfg.data_dir / "train"]
    for src in sources:
        if src.is_file():
            try:
                return {int(k): str(v) for k, v in json.loads(src.read_text()).items()}
            except (ValueError, AttributeError) as e:
                raise ValueError(f"serve.label_source: {src} must hold a JSON object {{label: prompt}}: {e}") from None
        out: dict[int, str] = {}
        for shard in sorted(src.glob("*.parquet")) if src.is_dir() else []:
            table = pq.read_table(shard, columns=["label", "prompt"]).drop_null()
            if len(table) == 0:
                break  # a text dataset: no classes
            for lab, prompt in zip(table.column("label").to_pylist(), table.column("prompt").to_pylist()):
                out.setdefault(int(lab), prompt)
        if out:
            return out
    return {}


# -- MLflow: a grid per batch into one evaluation run per replica ------------------------------
class MlflowImageLog:
    """Logs each batch's images as one grid (plus prompts, seeds, settings) off the request path."""

    def __init__(self, cfg: Config, model_name: str, checkpoint: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(cfg.mlflow_uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else self._create_experiment(cfg.experiment)
        run = self.client.create_run(exp_id, run_name=f"serve-{model_name}", tags={
            "cca_ray.stage": "serve", "cca_ray.run_type": "evaluation", "cca_ray.train.checkpoint": checkpoint,
            "cca_ray.model_name": model_name})
        self.run_id = run.info.run_id
        self.batches = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-images")

    def _create_experiment(self, name: str) -> str:
        try:
            return self.client.create_experiment(name)
        except Exception:  # another replica created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log_batch(self, images: np.ndarray, prompts: list[str], seeds: list[int], key: SamplingKey) -> None:
        k, self.batches = self.batches, self.batches + 1
        meta = {"prompts": prompts, "seeds": seeds, **key._asdict()}
        self.pool.submit(self._write, k, images.copy(), meta)

    def _write(self, k: int, images: np.ndarray, meta: dict) -> None:
        try:
            tag = f"g{meta['guidance_scale']:g}"
            self.client.log_image(self.run_id, image_grid(images), artifact_file=f"serve/batch_{k:06d}_{tag}.png")
            self.client.log_dict(self.run_id, meta, f"serve/batch_{k:06d}_{tag}.json")
            self.client.log_metric(self.run_id, "serve_batch_images", len(images), step=k)
        except Exception:  # logging must never fail a request
            log.exception("MLflow image logging failed")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.set_terminated(self.run_id)
