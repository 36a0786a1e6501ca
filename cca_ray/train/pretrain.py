"""Make the base model p_phi: SFT with condition dropout, on the same trainer as CCA (section `pretrain`).

    python -m cca_ray.pretrain --preset smoke --workdir DIR

No pretrained weights can be downloaded here, so the demo builds a tiny random-init Emu3 of
`model.*`'s size (BPE trained on the dataset's prompts, one visual token per code) under
`<base_model_dir>/../init`, trains it on `data_dir/train` with objective sft (each prompt
replaced by "" with probability pretrain.cond_dropout, so the model also learns p(x) for CFG)
and copies the consolidated export into `base_model_dir`, which `train`, `tune`, `evaluate`
and `serve` read. A base model that already exists is kept (use --force to retrain).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cca_ray.fs import atomic_dir, copy_dir_atomic
from cca_ray.models import condition_kind, is_checkpoint
from cca_ray.config import Config, ConfigError
from cca_ray.data.shards import read_manifest
from cca_ray.raycluster import ensure_ray
from cca_ray.train.driver import TrainResult, run_training
from cca_ray.train.batches import TrainDataError


def build_init_model(cfg: Config, init_dir: Path) -> Path:
    """Random-init model sized by cfg.model; codebook from the data's tokenizer; conditions from the train
    split (text families: a BPE over its prompts; class families: its number of classes)."""
    from cca_ray.data import read_dataset
    from cca_ray.models import build_tiny_model

    if is_checkpoint(init_dir):
        return init_dir
    train_dir = cfg.data_dir / "train"
    manifest = read_manifest(train_dir)
    codebook = int(manifest.get("codebook_size") or cfg.tokenizer.codebook_size)
    conds = read_dataset(train_dir, columns=["prompt", "label"], validate=False)
    prompts = sorted({p for p in conds.column("prompt").to_pylist() if p})
    labels = [lab for lab in conds.column("label").to_pylist() if lab is not None]
    if condition_kind(cfg.model.family) == "label" and not labels:
        raise TrainDataError(f"{train_dir}: no labelled rows; model.family={cfg.model.family} is class-conditional")
    with atomic_dir(init_dir) as tmp:
        build_tiny_model(tmp, cfg.model, codebook_size=codebook, prompts=prompts,
                         num_classes=max(labels) + 1 if labels else None, grid=tuple(manifest["grid"]),
                         tokenizer_dir=cfg.data_dir / "tokenizer")
    return init_dir


def pretrain(cfg: Config, *, force: bool = False, run_name: str | None = None) -> Path:
    """Ensure cfg.base_model_dir holds a base checkpoint; train one if it does not. Returns its path."""
    from cca_ray import steps

    base = cfg.base_model_dir
    # the base model's step key (cca_ray.steps): a changed data/tokenizer/model/pretrain field retrains it
    key = steps.step_key(cfg, ("data", "tokenizer", "model", "pretrain"))
    if is_checkpoint(base) and not force:
        recorded = steps.marker_path(base).exists()
        if cfg.model.path or not recorded or steps.cached(base, key) is not None:
            print(f"base model already at {base} (pass --force to retrain)")
            return base
        print(f"base model at {base} was trained from other data/tokenizer/model/pretrain settings; retraining")
    if cfg.model.path:
        raise ConfigError(f"model.path is {cfg.model.path} but holds no checkpoint (config.json); pretrain only "
                          "builds the random-init demo model when model.path is unset")
    if cfg.pretrain.objective != "sft":
        raise ConfigError(f"pretrain.objective must be sft, got {cfg.pretrain.objective}")
    from cca_ray.data.prepare import prepare

    ensure_ray()  # before prepare(), which would otherwise start Ray its own way
    prepare(cfg)  # no-op when data_dir already holds this config's data
    init = build_init_model(cfg, base.parent / "init")
    result: TrainResult = run_training(cfg, "pretrain", model_dir=init, run_name=run_name)
    if result.export_dir is None:
        raise RuntimeError(f"pretrain run {result.run_name} produced no checkpoint to export")
    copy_dir_atomic(result.export_dir, base)
    steps.store(base, key, {"run": result.run_name, "step": result.metrics.get("step")})
    print(f"base model: {base} (from run {result.run_name}, step {result.metrics.get('step')}, "
          f"loss {result.metrics.get('loss')})")
    return base


def main(argv=None) -> None:
    from cca_ray.cli import parse_stage_args
    from cca_ray.data.schema import DataError

    def add(p):
        p.add_argument("--force", action="store_true", help="retrain even if the base model exists")
        p.add_argument("--run-name", help="run to create or resume (default: derived from the config)")

    cfg, args = parse_stage_args("pretrain", "SFT with condition dropout: builds the base model", argv, add)
    try:
        pretrain(cfg, force=args.force, run_name=args.run_name)
    except (ConfigError, TrainDataError, DataError) as e:
        raise SystemExit(f"cca_ray.train.pretrain: error: {e}") from None


if __name__ == "__main__":
    main()
