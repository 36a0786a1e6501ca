"""The Ray Data side of `prepare`: read sources, tokenize in an actor pool, write shards and pairs.

    source units --map_batches(read)--> images --map_batches(Tokenize, actor pool)--> codes
         --> train/ holdout/ (parquet + manifest)  --pairing join--> pairs/

Ray appears only here and in reference.py; the pieces it runs (sources, tokenizers,
pairing, schema checks) are plain functions and classes tested without Ray. Callers join or start
Ray with `cca_ray.raycluster.ensure_ray()` (the one cluster setup every stage shares); the datasets
built here are created inside `ordered_datasets()` so their block order is deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cca_ray.data.pairing import pair_table
from cca_ray.data.schema import BASE_SCHEMA, DataError, code_problem, unwrap_ray_error
from cca_ray.fs import atomic_dir
from cca_ray.data.shards import make_manifest, read_dataset, read_manifest, shard_files, write_manifest
from cca_ray.data.sources import Row, split_of

log = logging.getLogger(__name__)

# the decoded-image stage between reading and tokenizing (internal; never written)
ROWS_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("prompt", pa.string()),
                         ("source_id", pa.string()), ("split", pa.string()), ("error", pa.string())])
CODES_SCHEMA = pa.schema(list(BASE_SCHEMA) + [("split", pa.string()), ("error", pa.string())])


@contextlib.contextmanager
def ordered_datasets() -> Iterator:
    """Datasets created inside this block keep their blocks in order (`preserve_order`), so shards
    and manifests do not change from run to run. Scoped, not process-wide: Ray Data snapshots the
    current DataContext when a Dataset is created (read_*/from_* copy it, map_batches & co. inherit
    it), so only the datasets built here carry the setting, whenever they execute; other Ray Data
    users in the process (Ray Train, Tune) keep their own context. Yields the context in force.

    Progress bars on a terminal only: off one, Ray Data logs a multi-line progress block per dataset
    every few seconds and two INFO lines per execution, hundreds of lines before prepare's own one
    line per stage; there its logger keeps warnings and errors only (in this process, where the
    datasets execute, whenever they do)."""
    from ray.data import DataContext

    ctx = DataContext.get_current().copy()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = sys.stdout.isatty()
    if not ctx.enable_progress_bars:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    with DataContext.current(ctx):
        yield ctx


def run_ray(fn, *args, **kwargs):
    """Call fn, turning a DataError that Ray wrapped in a task error back into a DataError."""
    try:
        return fn(*args, **kwargs)
    except DataError:
        raise
    except Exception as e:
        err = unwrap_ray_error(e)
        if err is e:
            raise
        raise err from None


# -- read ----------------------------------------------------------------------------------
def read_units(batch: dict, source, units: list, on_bad_row: str, seed: int, holdout_fraction: float,
               image_size: int | None = None, augment: str = "none") -> pa.Table:
    """Ray task: read the source units named in batch["unit"] -> ROWS_SCHEMA table. data.augment expands a
    train image into its views (cca_ray/data/preprocess.py), each in the image's split."""
    from cca_ray.data.preprocess import augment_views, holdout_view

    rows: list[Row] = []
    for u in np.asarray(batch["unit"]).tolist():
        unit = units[u]
        try:
            rows.extend(list(source.read(unit)))  # all or nothing: no duplicate rows on a mid-unit failure
        except DataError as e:  # a whole unreadable slice (truncated file): every row in it is bad
            if on_bad_row == "error":
                raise
            rows.extend(Row(f"{unit.file}#{r}", error=str(e)) for r in range(unit.start, unit.stop))
    cols: dict[str, list] = {k: [] for k in ROWS_SCHEMA.names}
    for r in rows:
        if r.error is not None and on_bad_row == "error":
            raise DataError(r.error)
        split = split_of(r.source_id, seed, holdout_fraction)
        views = [("", None)] if r.image is None else augment_views(r.image, image_size or r.image.shape[0], augment)
        for suffix, image in (views if split == "train" or r.image is None else holdout_view(views, augment)):
            cols["image"].append(None if image is None else image.tobytes())
            cols["label"].append(r.label)
            cols["prompt"].append(r.prompt)
            cols["source_id"].append(r.source_id + suffix)
            cols["split"].append(split)
            cols["error"].append(r.error)
    return pa.table(cols, schema=ROWS_SCHEMA)


def source_dataset(source, data_cfg):
    """The decoded images of a source as a Ray Dataset (ROWS_SCHEMA), one read task per unit."""
    import ray.data

    units = source.units()
    if not units:
        raise DataError(f"data.source={data_cfg.source}: no images found")
    with ordered_datasets():
        ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
    return ds.map_batches(read_units, batch_size=1, batch_format="numpy",
                          fn_kwargs=dict(source=source, units=units, on_bad_row=data_cfg.on_bad_row,
                                         seed=data_cfg.seed, holdout_fraction=data_cfg.holdout_fraction,
                                         image_size=data_cfg.image_size, augment=data_cfg.augment))


def fit_images(rows_ds, n_max: int, image_size: int, channels: int) -> np.ndarray:
    """Up to n_max good train images (uint8 [n, S, S, C]) from a ROWS_SCHEMA dataset, for k-means."""
    out, have = [], 0
    for t in rows_ds.iter_batches(batch_format="pyarrow", batch_size=1024):
        t = t.filter(pc.and_(pc.equal(t["split"], "train"), pc.is_null(t["error"])))
        for b in t.column("image").to_pylist()[: n_max - have]:
            out.append(np.frombuffer(b, dtype=np.uint8).reshape(image_size, image_size, channels))
        have = len(out)
        if have >= n_max:
            break
    if not out:
        raise DataError("no readable train images to fit the tokenizer on")
    return np.stack(out)


# -- tokenize ------------------------------------------------------------------------------
class Tokenize:
    """Ray Data actor: ROWS_SCHEMA batch -> CODES_SCHEMA batch. Loads the tokenizer once."""

    def __init__(self, tokenizer_dir: str, image_size: int, channels: int, on_bad_row: str):
        from cca_ray.tokenizers import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.code_shape = self.tok.identity().get("code_shape")  # VAR's flat scales; None: the grid
        self.shape = (image_size, image_size, channels)
        self.on_bad_row = on_bad_row

    def __call__(self, t: pa.Table) -> pa.Table:
        ok = pc.is_null(t["error"]).to_numpy(zero_copy_only=False)
        imgs = t.column("image").to_pylist()
        errors = t.column("error").to_pylist()
        codes: list[list[int]] = [[] for _ in range(len(t))]
        idx = np.flatnonzero(ok)
        gh, gw = self.tok.grid
        if len(idx):
            batch = np.stack([np.frombuffer(imgs[i], dtype=np.uint8).reshape(self.shape) for i in idx])
            enc = self.tok.encode(batch).reshape(len(idx), -1)
            sids = t.column("source_id").to_pylist()
            for k, i in enumerate(idx):
                # a tokenizer that disagrees with its own identity is a bug or a bad checkpoint
                problem = code_problem(enc[k], gh, gw, self.tok.grid, self.tok.codebook_size,
                                       self.code_shape)
                if problem:
                    if self.on_bad_row == "error":
                        raise DataError(f"{sids[i]}: {problem}")
                    errors[i] = f"{sids[i]}: {problem}"
                else:
                    codes[i] = enc[k].tolist()
        n = len(t)
        return pa.table({
            "codes": pa.array(codes, pa.list_(pa.int32())),
            "grid_h": pa.array([gh] * n, pa.int32()), "grid_w": pa.array([gw] * n, pa.int32()),
            "label": t["label"], "prompt": t["prompt"], "source_id": t["source_id"],
            "split": t["split"], "error": pa.array(errors, pa.string()),
        }, schema=CODES_SCHEMA)


def tokenize(rows_ds, tokenizer_dir: Path, data_cfg):
    """Encode images in a `data.tokenizer_workers`-actor pool (GPUs per actor: data.tokenizer_num_gpus)."""
    from ray.data import ActorPoolStrategy

    return rows_ds.map_batches(
        Tokenize, batch_format="pyarrow", batch_size=data_cfg.tokenizer_batch_size,
        fn_constructor_kwargs=dict(tokenizer_dir=str(tokenizer_dir), image_size=data_cfg.image_size,
                                   channels=data_cfg.channels, on_bad_row=data_cfg.on_bad_row),
        compute=ActorPoolStrategy(size=data_cfg.tokenizer_workers), num_gpus=data_cfg.tokenizer_num_gpus or None,
    )


# -- write ---------------------------------------------------------------------------------
def _select_split(t: pa.Table, split: str) -> pa.Table:
    keep = pc.and_(pc.equal(t["split"], split), pc.is_null(t["error"]))
    return t.filter(keep).select(BASE_SCHEMA.names)


def write_ray_dataset(ds, target: Path, manifest_fn, shard_rows: int, row_group_rows: int | None = None) -> dict:
    """Write a Ray Dataset as parquet into a temp dir beside `target`, add the manifest
    (manifest_fn(files) -> dict), then rename into place. Returns the manifest.

    Shards of exactly shard_rows rows (the last one fewer), in row groups of row_group_rows (None: one per
    shard). The blocks are cut to shard_rows first because write_parquet's min_rows_per_file also raises
    its row-group size to at least that many rows (ray.data's choose_row_group_limits)."""
    blocks = ds.repartition(target_num_rows_per_block=shard_rows, strict=True)
    with atomic_dir(target) as tmp:
        run_ray(blocks.write_parquet, str(tmp), max_rows_per_file=shard_rows,
                row_group_size=min(row_group_rows or shard_rows, shard_rows))
        files = shard_files(tmp)
        manifest = manifest_fn(files)
        write_manifest(tmp, manifest)
    return manifest


def write_splits(codes_ds, data_dir: Path, identity: dict, data_cfg, extra: dict) -> dict[str, dict]:
    """train/ and holdout/ from a materialized CODES_SCHEMA dataset; bad rows go to the manifests."""
    import ray

    meta = pa.concat_tables(ray.get(codes_ds.select_columns(["source_id", "split", "error"]).to_arrow_refs()))
    split, err = meta.column("split").to_pylist(), meta.column("error").to_pylist()
    sids = meta.column("source_id").to_pylist()
    out = {}
    for name in ("train", "holdout"):
        rows = sum(1 for s, e in zip(split, err) if s == name and e is None)
        skipped = [{"source_id": i, "error": e} for i, s, e in zip(sids, split, err) if s == name and e is not None]

        def manifest_fn(files, name=name, rows=rows, skipped=skipped):
            m = make_manifest(name, identity, rows, files, skipped, **extra)
            m["_all_skipped"] = skipped
            return m

        out[name] = write_ray_dataset(split_dataset(codes_ds, name), data_dir / name, manifest_fn, data_cfg.shard_rows,
                                      data_cfg.row_group_rows)
        log.info("%s: %d rows, %d skipped", name, rows, len(skipped))
    return out


def split_dataset(codes_ds, split: str):
    """The good rows of one split of a CODES_SCHEMA dataset, in the shard schema."""
    return codes_ds.map_batches(_select_split, fn_kwargs={"split": split}, batch_format="pyarrow", batch_size=None)


def _attach_negatives(t: pa.Table, lookup: pa.Table) -> pa.Table:
    """Join the pairing columns onto a batch of train rows by source_id (order preserved)."""
    idx = pc.index_in(t["source_id"], value_set=lookup["source_id"])
    if idx.null_count:
        raise DataError(f"pairing: {idx.null_count} train rows have no pairing entry (train/ changed while pairing?)")
    picked = lookup.take(idx)
    for name in ("neg_label", "neg_prompt", "pos_null", "neg_null"):
        t = t.append_column(name, picked[name])
    return t


def write_pairs(data_dir: Path, seed: int, null_prob: float, shard_rows: int, epoch: int = 0,
                train_ds=None, row_group_rows: int | None = None) -> dict:
    """pairs/: train rows + neg_label, neg_prompt, pos_null, neg_null (pairing.pair_table).

    The pairing is global (drawn over all train rows in source_id order) and joined onto
    the rows by a Ray Data map, so it does not depend on block or batch sizes. train_ds:
    the train rows as a Ray Dataset if already at hand (else read from data_dir/train)."""
    train = data_dir / "train"
    tm = read_manifest(train)
    conds = read_dataset(train, columns=["source_id", "prompt", "label"], validate=False)
    lookup = pair_table(conds, seed, epoch, null_prob).select(
        ["source_id", "neg_label", "neg_prompt", "pos_null", "neg_null"])
    n = len(lookup)
    null_ratio = {"pos": float(pc.sum(lookup["pos_null"]).as_py() or 0) / max(n, 1),
                  "neg": float(pc.sum(lookup["neg_null"]).as_py() or 0) / max(n, 1)}
    if train_ds is None:
        with ordered_datasets():
            train_ds = read_dataset(train, as_ray=True)
    ds = train_ds.map_batches(_attach_negatives, fn_kwargs={"lookup": lookup}, batch_format="pyarrow")
    extra = {k: tm[k] for k in ("config", "source") if k in tm}
    digest = hashlib.sha256()
    for name in lookup.column_names:  # names this exact pairing: the reference pass records it
        digest.update(str(lookup.column(name).to_pylist()).encode())
    pairing = {"seed": seed, "epoch": epoch, "null_prob": null_prob, "null_ratio": null_ratio,
               "fingerprint": digest.hexdigest()[:16]}

    def manifest_fn(files):
        m = make_manifest("pairs", tm["tokenizer"], n, files, pairing=pairing, **extra)
        m["skipped"], m["counts"]["skipped"] = tm["skipped"], tm["skipped"]["count"]  # pairs = train rows
        return m

    return write_ray_dataset(ds, data_dir / "pairs", manifest_fn, shard_rows, row_group_rows)
