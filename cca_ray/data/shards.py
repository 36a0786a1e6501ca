"""Dataset directories on disk: parquet shards + manifest.json, written atomically, read with checks.

Layout under cfg.data_dir:

    tokenizer/   the fitted image tokenizer
    train/  holdout/  pairs/  pairs_ref/     each: part-*.parquet + manifest.json

A dataset directory is complete iff it has manifest.json. Writers build it in a hidden
temp dir beside the target (`.train.tmp-<id>`) and rename it into place after the
manifest is written, so an interrupted prepare leaves the old dataset or none, never half
a new one. Readers (`read_manifest`, `read_dataset`) refuse a directory without manifest.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cca_ray.data.schema import SCHEMA_VERSION, SCHEMAS, DataError, check_columns, validate_codes
from cca_ray.fs import atomic_dir, write_json_atomic  # noqa: F401  (atomic_dir: re-exported for writers)

MANIFEST = "manifest.json"
MAX_SKIPPED_IN_MANIFEST = 1000  # the full list goes to skipped.jsonl beside it


def shard_files(directory: str | Path) -> list[str]:
    """Parquet shard names in a dataset dir, sorted."""
    return sorted(p.name for p in Path(directory).glob("*.parquet"))


def make_manifest(dataset: str, tokenizer: dict, rows: int, files: list[str], skipped: list[dict] | None = None,
                  **extra) -> dict:
    """The manifest of one dataset dir. skipped: [{"source_id", "error", ...}] rows left out (on_bad_row=skip)."""
    skipped = skipped or []
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": tokenizer,
        "grid": tokenizer.get("grid"),
        "codebook_size": tokenizer.get("codebook_size"),
        "counts": {"rows": int(rows), "files": len(files), "skipped": len(skipped)},
        "files": list(files),
        "skipped": {"count": len(skipped), "rows": skipped[:MAX_SKIPPED_IN_MANIFEST],
                    "truncated": len(skipped) > MAX_SKIPPED_IN_MANIFEST},
        **extra,
    }


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Write manifest.json (and skipped.jsonl when rows were skipped) into a dataset dir."""
    directory = Path(directory)
    skipped = manifest.get("skipped", {})
    if skipped.get("count"):
        with open(directory / "skipped.jsonl", "w") as f:
            for r in manifest.pop("_all_skipped", skipped["rows"]):
                f.write(json.dumps(r) + "\n")
    manifest.pop("_all_skipped", None)
    write_json_atomic(directory / MANIFEST, manifest)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a complete dataset dir; DataError if missing (incomplete) or unreadable."""
    directory = Path(directory)
    f = directory / MANIFEST
    if not f.exists():
        why = "does not exist" if not directory.exists() else "has no manifest.json (incomplete or not a dataset)"
        raise DataError(f"{directory}: {why}; run `python -m cca_ray.prepare` to (re)build it")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None
    if m.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{f}: schema_version {m.get('schema_version')!r}, this code reads {SCHEMA_VERSION}; re-run prepare")
    return m


def write_table_shards(table: pa.Table, directory: str | Path, shard_rows: int, prefix: str = "part",
                       row_group_rows: int | None = None) -> list[str]:
    """Write an Arrow table as part-00000.parquet, ... of at most shard_rows rows, in row groups of at most
    row_group_rows rows (None: one per shard); a streamed read reads whole row groups. -> file names."""
    names = []
    for i, start in enumerate(range(0, max(len(table), 1), shard_rows)):
        name = f"{prefix}-{i:05d}.parquet"
        pq.write_table(table.slice(start, shard_rows), Path(directory) / name, row_group_size=row_group_rows)
        names.append(name)
    return names


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One parquet shard; DataError naming the file if it is truncated or not parquet."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataError(f"{path}: cannot read parquet, the file is truncated or corrupt ({e})") from None


def read_dataset(directory: str | Path, columns: list[str] | None = None, validate: bool = True,
                 as_ray: bool = False):
    """A complete dataset dir as one pyarrow.Table (or a ray.data.Dataset with as_ray=True).

    Checks (DataError naming file and row): manifest present, listed shards present and
    readable, required columns (per the dataset's schema), grid and code range against
    the manifest's tokenizer, and the row count against the manifest.
    """
    directory = Path(directory)
    m = read_manifest(directory)
    paths = [directory / f for f in m["files"]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{directory}: shard(s) listed in manifest.json are missing: {', '.join(missing)}")
    required = SCHEMAS.get(m.get("dataset"), SCHEMAS["train"]).names
    if as_ray:
        import ray.data

        for p in paths:  # cheap footer/schema check before handing the files to Ray
            try:
                check_columns(pq.read_schema(p), required, str(p))
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{p}: cannot read parquet, the file is truncated or corrupt ({e})") from None
        return ray.data.read_parquet([str(p) for p in paths], columns=columns)
    tables, offset = [], 0
    for p in paths:
        t = read_shard(p)
        if validate:
            check_columns(t, required, str(p))
            validate_codes(t, str(p), tuple(m["grid"]), int(m["codebook_size"]),
                           code_shape=(m.get("tokenizer") or {}).get("code_shape"))
        tables.append(t.select(columns) if columns else t)
        offset += len(t)
    if offset != m["counts"]["rows"]:
        raise DataError(f"{directory}: manifest.json says {m['counts']['rows']} rows, the shards hold {offset}")
    if not tables:
        schema = SCHEMAS.get(m.get("dataset"), SCHEMAS["train"])
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")
