"""Reference pass: the frozen base model scores every pair once (Ray Data batch inference).

    pairs/ --map_batches(ReferenceScorer, actor pool)--> pairs_ref/
                                             (+ ref_logp_pos, ref_logp_neg, ref_logp_null)

float32 nats summed over the image tokens:

    ref_logp_pos  = log p_phi(x | c)        the row's own prompt, always (whatever pos_null says)
    ref_logp_neg  = log p_phi(x | c_neg)    the paired negative prompt, always (whatever neg_null says)
    ref_logp_null = log p_phi(x | "")       the null condition

cca/dpo read pos/neg as they are; cca_cfg takes ref_logp_null wherever a row's pos_null/neg_null
flag replaced that condition by "" (`cca_ray.train.batches.make_micro_batch`). ref_logp_null costs
one more forward per pair (50% of the pass), so it is scored only when asked for (`score_null`,
by default when train.objective is cca_cfg); otherwise the column is all null and the manifest
says `null_scored: false`, which `verify_reference(..., need_null=True)` refuses (a later cca_cfg
run re-scores; a pairs_ref with the column serves every objective).

pairs_ref/manifest.json records the reference checkpoint id (`checkpoint_id(path)`), the pairing
it scored and REFERENCE_VERSION; `verify_reference` is what the trainer calls to refuse columns
computed from any other checkpoint, pairing, or by an older reference pass (version 1 scored
flagged rows with "" in ref_logp_pos/neg and had no ref_logp_null), which then gets recomputed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from cca_ray.data.fingerprint import checkpoint_id
from cca_ray.data.schema import DataError
from cca_ray.data.shards import make_manifest, read_dataset, read_manifest
from cca_ray.models import is_checkpoint, loader_options

_ROW_IN_BATCH = re.compile(r"(?:prompt|condition) (\d+)")  # the adapters name the row in a batch
# how the ref_logp_* columns are scored; bump when that changes so older pairs_ref dirs read as stale.
# 1: null flags applied to ref_logp_pos/neg, no ref_logp_null. 2: real prompts + ref_logp_null.
REFERENCE_VERSION = 2


class ReferenceMismatchError(DataError):
    """Precomputed reference log-probs come from another checkpoint, pairing or reference-pass version."""


def _conditions(values: list, sids: list, column: str) -> list:
    """The conditions to score (the real ones: null flags do not apply here); DataError naming the row
    if one is missing or blank."""
    for v, sid in zip(values, sids):
        if v is None or not str(v).strip():
            what = "text prompts" if "prompt" in column else "class labels"
            raise DataError(f"{sid}: empty {column}; the reference model is conditioned on {what}")
    return list(values)


class ReferenceScorer:
    """Ray Data actor holding the frozen base model; pairs batch -> batch + ref_logp_pos/neg/null."""

    def __init__(self, checkpoint: str, load_options: dict, dtype: str, codebook_size: int, grid: tuple[int, int],
                 code_shape: tuple[int, ...] | None = None, score_null: bool = True):
        import torch

        from cca_ray.models import load_model

        self.torch = torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(checkpoint, **load_options, device=device, dtype=dtype)
        self.model.module.eval()
        self.grid = tuple(grid)
        self.score_null = score_null
        self.code_shape = tuple(code_shape or grid)
        self.column = "prompt" if self.model.condition_kind == "prompt" else "label"
        if self.model.codebook_size < codebook_size:
            raise DataError(f"{checkpoint}: the model has {self.model.codebook_size} visual tokens, "
                            f"the shards were tokenized with a {codebook_size}-code tokenizer")

    def _logp(self, conds: list | None, codes, sids: list) -> np.ndarray:
        """log p_phi(codes | conds) float32 [B]; conds None = the null condition for every row."""
        try:
            cond = (self.model.null_condition(len(sids), self.grid) if conds is None
                    else self.model.encode_conditions(conds, self.grid))
        except ValueError as e:  # the adapter names the row within the batch; name the image
            m = _ROW_IN_BATCH.search(str(e))
            where = sids[int(m.group(1))] if m else f"batch starting at {sids[0]}"
            raise DataError(f"{where}: {e}") from None
        drop = {}
        if getattr(self.model, "takes_drop_seeds", False):  # the trainer's drop-path draws (batches.row_seeds)
            from cca_ray.train.batches import row_seeds

            drop = {"drop_seeds": self.torch.from_numpy(row_seeds(sids))}
        with self.torch.no_grad():
            return self.model.sequence_logprob(cond, codes, **drop).float().cpu().numpy().astype(np.float32)

    def __call__(self, t: pa.Table) -> pa.Table:
        torch = self.torch
        sids = t.column("source_id").to_pylist()
        flat = t.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        codes = torch.from_numpy(flat.astype(np.int64).reshape(len(t), *self.code_shape)).to(self.model.device)
        col, neg = self.column, f"neg_{self.column}"
        conds = {"ref_logp_pos": _conditions(t.column(col).to_pylist(), sids, col),
                 "ref_logp_neg": _conditions(t.column(neg).to_pylist(), sids, neg),
                 "ref_logp_null": None}
        t = t.drop_columns([name for name in conds if name in t.column_names])
        for name, prompts in conds.items():
            if name == "ref_logp_null" and not self.score_null:  # no objective asked for it: all null
                t = t.append_column(name, pa.nulls(len(t), pa.float32()))
                continue
            t = t.append_column(name, pa.array(self._logp(prompts, codes, sids), pa.float32()))
        return t


def reference_pass(cfg, checkpoint: str | Path | None = None, data_dir: str | Path | None = None,
                   force: bool = False, score_null: bool | None = None) -> dict:
    """Score data_dir/pairs with the frozen `checkpoint` (default cfg.base_model_dir) into
    data_dir/pairs_ref, atomically. Workers: data.reference_workers actors, each with
    data.reference_num_gpus GPUs, data.reference_batch_size pairs per call. Skipped (unless
    force) when pairs_ref already holds this checkpoint's scores of the current pairs, made by
    this REFERENCE_VERSION of the pass. `score_null` (default: train.objective is cca_cfg) adds
    ref_logp_null; a pairs_ref that has it is kept for either value.
    Returns the manifest."""
    from ray.data import ActorPoolStrategy

    from cca_ray.data.pipeline import ordered_datasets, write_ray_dataset
    from cca_ray.raycluster import ensure_ray

    data_dir = Path(data_dir or cfg.data_dir)
    checkpoint = Path(checkpoint or cfg.base_model_dir).expanduser().resolve()
    if not is_checkpoint(checkpoint):
        raise DataError(f"{checkpoint}: no model checkpoint (config.json missing) for the reference pass")
    pm = read_manifest(data_dir / "pairs")
    ref_id = checkpoint_id(checkpoint)
    if score_null is None:
        score_null = cfg.train.objective == "cca_cfg"
    if not force:
        try:
            return verify_reference(data_dir / "pairs_ref", ref_id, data_dir / "pairs", need_null=score_null)
        except DataError:
            pass  # missing, incomplete or stale: (re)compute
    ensure_ray()
    d = cfg.data
    with ordered_datasets():
        ds = read_dataset(data_dir / "pairs", as_ray=True)
    ds = ds.map_batches(
        ReferenceScorer, batch_format="pyarrow", batch_size=d.reference_batch_size,
        fn_constructor_kwargs=dict(checkpoint=str(checkpoint), load_options=loader_options(cfg.model, checkpoint),
                                   dtype=cfg.model.dtype,
                                   codebook_size=int(pm["codebook_size"]), grid=tuple(pm["grid"]),
                                   code_shape=(pm.get("tokenizer") or {}).get("code_shape"), score_null=score_null),
        compute=ActorPoolStrategy(size=d.reference_workers), num_gpus=d.reference_num_gpus or None,
    )
    reference = {"checkpoint_id": ref_id, "path": str(checkpoint), "family": cfg.model.family,
                 "dtype": cfg.model.dtype, "pairing": pm.get("pairing"), "version": REFERENCE_VERSION,
                 "null_scored": bool(score_null)}

    def manifest_fn(files):
        m = make_manifest("pairs_ref", pm["tokenizer"], pm["counts"]["rows"], files,
                          reference=reference, pairing=pm.get("pairing"),
                          **{k: pm[k] for k in ("config",) if k in pm})
        m["skipped"], m["counts"]["skipped"] = pm["skipped"], pm["skipped"]["count"]
        return m

    return write_ray_dataset(ds, data_dir / "pairs_ref", manifest_fn, d.shard_rows, d.row_group_rows)


def verify_reference(pairs_ref_dir: str | Path, checkpoint: str | Path, pairs_dir: str | Path | None = None,
                     need_null: bool = False) -> dict:
    """Check that pairs_ref's ref_logp_* columns came from `checkpoint` (a path or a
    'sha256:...' id), from this code's REFERENCE_VERSION of the pass, if pairs_dir is given,
    from its current pairing, and if need_null (cca_cfg) that ref_logp_null was scored.
    Returns the manifest; raises ReferenceMismatchError otherwise."""
    pairs_ref_dir = Path(pairs_ref_dir)
    m = read_manifest(pairs_ref_dir)
    recorded = (m.get("reference") or {}).get("checkpoint_id")
    if recorded is None:
        raise ReferenceMismatchError(f"{pairs_ref_dir}/manifest.json records no reference checkpoint id")
    version = m["reference"].get("version", 1)
    if version != REFERENCE_VERSION:
        raise ReferenceMismatchError(
            f"{pairs_ref_dir}: written by reference pass version {version}, this code reads version "
            f"{REFERENCE_VERSION} (real prompts in ref_logp_pos/ref_logp_neg plus a ref_logp_null column); "
            "re-run the reference pass (`python -m cca_ray.prepare --reference base`; train/tune do it themselves)")
    expected = str(checkpoint) if str(checkpoint).startswith("sha256:") else checkpoint_id(checkpoint)
    if recorded != expected:
        raise ReferenceMismatchError(
            f"{pairs_ref_dir}: ref_logp_pos/ref_logp_neg were computed with reference checkpoint {recorded} "
            f"({m['reference'].get('path')}), but the expected reference is {expected} ({checkpoint}); "
            f"re-run `python -m cca_ray.prepare --reference {checkpoint}` or use train.reference=online")
    if pairs_dir is not None:
        current = read_manifest(pairs_dir).get("pairing")
        if current != m.get("pairing"):
            raise ReferenceMismatchError(f"{pairs_ref_dir}: computed for pairing {m.get('pairing')}, but {pairs_dir} "
                                         f"now holds pairing {current}; re-run the reference pass")
    if need_null and not m["reference"].get("null_scored", True):
        raise ReferenceMismatchError(f"{pairs_ref_dir}: ref_logp_null was not scored (no objective then read it); "
                                     "objective cca_cfg needs it: re-run the reference pass")
    return m
