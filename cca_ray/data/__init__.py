"""Stage `prepare` and the data every later stage reads: sources, the Ray Data pipeline, pairing, shards.

The API later stages use (no Ray needed for reading):

    read_manifest(dir) -> dict                  # DataError if the dir is incomplete
    read_dataset(dir) -> pyarrow.Table          # checked: columns, grid, code range, counts
    read_dataset(dir, as_ray=True) -> ray.data.Dataset
    pair_table(train_table, seed, epoch, null_prob)   # re-pair per epoch
    checkpoint_id(path)                         # names a model checkpoint by content
    load_data_tokenizer(data_dir)               # the tokenizer, checked against train/'s manifest
    dataset_dir(cfg, "train" | "holdout" | "pairs" | "pairs_ref" | "tokenizer")

Modules, in the order data flows: sources (images + conditions), pipeline (Ray Data: read,
tokenize, write), pairing (pure: negatives, null flags), shards (manifests, checked readers),
schema (columns + checks), fingerprint; prepare.py runs them as the stage. The reference pass
(the base model scoring every pair) is model inference and lives with training:
cca_ray/train/reference.py.
"""

from __future__ import annotations

from pathlib import Path

from cca_ray.data.fingerprint import checkpoint_id
from cca_ray.data.pairing import pair_columns, pair_negatives, pair_table
from cca_ray.data.schema import SCHEMA_VERSION, SCHEMAS, DataError
from cca_ray.data.shards import read_dataset, read_manifest

DATASET_DIRS = ("tokenizer", "train", "holdout", "pairs", "pairs_ref")


def dataset_dir(cfg, name: str) -> Path:
    """cfg.data_dir / name, for one of DATASET_DIRS."""
    if name not in DATASET_DIRS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_DIRS)}")
    return cfg.data_dir / name


def load_data_tokenizer(data_dir: str | Path, dataset: str = "train", device: str | None = None):
    """The tokenizer saved under data_dir/tokenizer, checked against data_dir/<dataset>'s manifest
    (DataError if the codes there came from another tokenizer, e.g. after an interrupted re-prepare)."""
    from cca_ray.tokenizers import load_tokenizer

    data_dir = Path(data_dir)
    want = read_manifest(data_dir / dataset)["tokenizer"]
    tok = load_tokenizer(data_dir / "tokenizer", device=device)
    if tok.identity() != want:
        raise DataError(f"{data_dir / 'tokenizer'}: tokenizer {tok.identity().get('fingerprint')} is not the one that "
                        f"made {data_dir / dataset} ({want.get('fingerprint')}); re-run `python -m cca_ray.prepare`")
    return tok


__all__ = [
    "DATASET_DIRS", "SCHEMA_VERSION", "SCHEMAS", "DataError", "checkpoint_id",
    "dataset_dir", "load_data_tokenizer", "pair_columns", "pair_negatives", "pair_table", "read_dataset",
    "read_manifest",
]
