"""Stage `prepare`: images + conditions -> token shards and CCA pairs, on Ray Data.

    python -m cca_ray.prepare --preset smoke --workdir /tmp/x
    python -m cca_ray.prepare --preset demo --on-bad-row skip
    python -m cca_ray.prepare --preset demo --reference base      # adds pairs_ref/ (or --reference DIR)

Steps: source (data.source) -> fit the image tokenizer on the train split (k-means) ->
tokenize in a Ray Data actor pool -> train/ and holdout/ shards -> pairs/ (negatives +
CCA+CFG null flags). The reference pass (`--reference CKPT`, or `reference_pass()`) needs
a base model, so it runs on request once pretrain has made one. Everything lands under
cfg.data_dir; each dataset dir appears complete (with manifest.json) or not at all.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from cca_ray.cli import parse_stage_args
from cca_ray.config import Config, ConfigError
from cca_ray.data.schema import DataError
from cca_ray.data.shards import read_manifest
from cca_ray.tokenizers.base import read_meta

log = logging.getLogger("cca_ray.data.prepare")

DATASETS = ("train", "holdout", "pairs")
# fields that change how fast prepare runs, not what it writes
_SPEED_ONLY = {"tokenizer_workers", "tokenizer_batch_size", "tokenizer_num_gpus", "reference_workers",
               "reference_batch_size", "reference_num_gpus"}


def data_fingerprint(cfg: Config) -> dict:
    """The config that determines prepare's output (recorded in every manifest)."""
    data = {k: v for k, v in cfg.data.model_dump(mode="json").items() if k not in _SPEED_ONLY}
    return {"data": data, "tokenizer": cfg.tokenizer.model_dump(mode="json")}


def is_prepared(cfg: Config) -> bool:
    """True if tokenizer/, train/, holdout/ and pairs/ are complete, made from this config and
    agree on the tokenizer (so an interrupted re-prepare is never mistaken for a finished one)."""
    try:
        ident = read_meta(cfg.data_dir / "tokenizer")["identity"]
        manifests = [read_manifest(cfg.data_dir / name) for name in DATASETS]
    except (DataError, FileNotFoundError, ValueError):
        return False
    want = data_fingerprint(cfg)
    return all(m.get("config") == want and m.get("tokenizer") == ident for m in manifests)


def prepare(cfg: Config, force: bool = False) -> dict[str, dict]:
    """Run the whole data stage (skipped if is_prepared(cfg) and not force). -> manifests by dataset."""
    from cca_ray.data.pipeline import (fit_images, run_ray, source_dataset, split_dataset, tokenize, write_pairs,
                                       write_splits)
    from cca_ray.fs import atomic_dir
    from cca_ray.data.sources import make_source
    from cca_ray.raycluster import ensure_ray
    from cca_ray.tokenizers import build_tokenizer

    data_dir = cfg.data_dir
    if not force and is_prepared(cfg):
        log.info("%s: already prepared with this config (use --force to rebuild)", data_dir)
        return {name: read_manifest(data_dir / name) for name in DATASETS}
    d = cfg.data
    try:
        tok = build_tokenizer(cfg.tokenizer, d.image_size, d.channels)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    source = make_source(d)
    ensure_ray()
    rows_ds = source_dataset(source, d)
    if tok.needs_fit:
        # k-means must see the train split before anything is encoded: keep the decoded images
        rows_ds = run_ray(rows_ds.materialize)
        # 4x the images the patch budget needs, so fit()'s random patch subsample is not just the
        # first files of a source sorted by class
        n_fit = 4 * math.ceil(cfg.tokenizer.kmeans_max_patches / (tok.grid[0] * tok.grid[1]))
        images = run_ray(fit_images, rows_ds, n_fit, d.image_size, d.channels)
        log.info("fitting %s tokenizer on %d train images", tok.kind, len(images))
        tok.fit(images, progress=True)
    with atomic_dir(data_dir / "tokenizer") as tmp:
        tok.save(tmp)
    identity = tok.identity()
    codes_ds = run_ray(tokenize(rows_ds, data_dir / "tokenizer", d).materialize)
    extra = {"config": data_fingerprint(cfg), "source": {"kind": d.source, "path": d.path}}
    manifests = write_splits(codes_ds, data_dir, identity, d, extra)
    manifests["pairs"] = write_pairs(data_dir, d.seed, d.null_prob, d.shard_rows,
                                     train_ds=split_dataset(codes_ds, "train"), row_group_rows=d.row_group_rows)
    return manifests


def _summary(manifests: dict[str, dict], data_dir: Path) -> str:
    lines = [f"prepared {data_dir}"]
    for name, m in manifests.items():
        skipped = m["skipped"]["count"]
        note = f", {skipped} skipped (see {data_dir / name}/skipped.jsonl)" if skipped else ""
        lines.append(f"  {name:9s} {m['counts']['rows']:7d} rows in {m['counts']['files']} shard(s){note}")
    tok = next(iter(manifests.values()))["tokenizer"]
    lines.append(f"  tokenizer {tok['family']} {tok['version']}: {tok['codebook_size']} codes, grid {tok['grid']}")
    return "\n".join(lines)


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-bad-row", choices=["error", "skip"], default=None,
                   help="bad images/rows: stop with an error naming file and row (default), or skip and "
                        "record them in the manifest (same as data.on_bad_row)")
    p.add_argument("--force", action="store_true", help="rebuild even if the data is already prepared")
    p.add_argument("--reference", metavar="CKPT", default=None,
                   help="also run the reference pass (pairs_ref/) with this base checkpoint dir; "
                        "'base' means the workdir's base model (cfg.base_model_dir)")


def main(argv=None) -> None:
    cfg, args = parse_stage_args("prepare", "Tokenize images into parquet shards and CCA pairs (Ray Data).",
                                 argv, _add_args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.on_bad_row:
        cfg.data.on_bad_row = args.on_bad_row
    try:
        manifests = prepare(cfg, force=args.force)
        if args.reference:
            from cca_ray.train.reference import reference_pass

            ckpt = cfg.base_model_dir if args.reference == "base" else Path(args.reference)
            manifests["pairs_ref"] = reference_pass(cfg, ckpt, force=args.force)
    except ConfigError as e:
        print(f"cca_ray.data.prepare: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (DataError, FileNotFoundError) as e:
        print(f"cca_ray.data.prepare: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(_summary(manifests, cfg.data_dir))


if __name__ == "__main__":
    main()
