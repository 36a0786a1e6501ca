"""What each trainer rank feeds its model at each step: rows in memory, a deterministic plan, micro-batches.

Exact resume ("no step done twice or skipped") needs the data order to be a pure function of
the step number, so the trainer does not stream through a Ray Data iterator (whose split
between workers depends on timing). Instead every rank holds the dataset's columns it needs
(codes are int32: the demo's 5k x 49 codes are 1 MB; Emu3 at 8,100 codes/image is 32 KB a row)
and :class:`BatchPlan` maps (step, rank, micro-step) to row indices:

    epoch, s = divmod(step, steps_per_epoch)
    perm     = permutation(num_rows) seeded by (seed, epoch)
    rows     = perm[s*G + (micro*world + rank)*M : ... + M]          G = world * M * grad_accum

Each optimizer step consumes G distinct rows; the tail of an epoch (< G rows) is dropped.
Negatives are the data's own pairing (``neg_prompt``), never a roll of the micro-batch, so
results do not depend on the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAIRED_OBJECTIVES = ("cca", "cca_cfg", "dpo", "unlearning")
REFERENCE_OBJECTIVES = ("cca", "cca_cfg", "dpo")  # the ones that read log p_phi


class TrainDataError(ValueError):
    """Training data that cannot be used; the message names the dataset dir and the row."""


@dataclass
class TrainRows:
    """A dataset's rows, in memory. N rows, grid (h, w).

    codes int32 [N, h, w]; prompt: N strings; for pairs: neg_prompt (N strings), pos_null and
    neg_null (bool [N]); for pairs_ref also ref_logp_pos / ref_logp_neg (float32 [N], nats).

    Two conventions for the reference columns: with a ``ref_logp_null`` column (log p_phi(x | "")),
    ref_logp_pos/neg are scored with the real prompts and cca_cfg swaps in ref_logp_null where a
    null flag is set; without it, ref_logp_pos/neg were scored with the null flags already applied
    (valid for cca_cfg, and for every objective only on rows without a flag).
    """

    codes: np.ndarray
    prompt: list[str]
    neg_prompt: list[str] | None = None
    pos_null: np.ndarray | None = None
    neg_null: np.ndarray | None = None
    ref_logp_pos: np.ndarray | None = None
    ref_logp_neg: np.ndarray | None = None
    ref_logp_null: np.ndarray | None = None
    source: str = "<memory>"
    manifest: dict | None = None

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.codes.shape[1]), int(self.codes.shape[2])


def dataset_for(objective: str, reference: str) -> str:
    """Which dataset dir under data_dir an objective reads."""
    if objective == "sft":
        return "train"
    if objective == "unlearning":
        return "pairs"  # no reference at all
    return "pairs_ref" if reference == "precomputed" else "pairs"


def read_manifest(dataset_dir: str | Path) -> dict:
    """The dataset's manifest.json (DataError naming the dir if it is missing or incomplete)."""
    from cca_ray.data.shards import read_manifest as _read

    return _read(dataset_dir)


def read_rows(dataset_dir: str | Path, *, pairs: bool, reference: bool) -> TrainRows:
    """Read (and validate, via the data package) a dataset dir's shards into TrainRows."""
    from cca_ray.data.shards import read_dataset

    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    cols = ["codes", "grid_h", "grid_w", "prompt", "source_id"]
    cols += ["neg_prompt", "pos_null", "neg_null"] if pairs else []
    cols += ["ref_logp_pos", "ref_logp_neg"] if reference else []
    t = read_dataset(dataset_dir)
    if reference and "ref_logp_null" in t.column_names:
        cols.append("ref_logp_null")
    missing = [c for c in cols if c not in t.column_names]
    if missing:
        raise TrainDataError(f"{dataset_dir}: missing column(s) {', '.join(missing)}")
    t = t.select(cols)
    if len(t) == 0:
        raise TrainDataError(f"{dataset_dir}: no rows")
    gh, gw = t.column("grid_h").to_numpy(), t.column("grid_w").to_numpy()
    bad = np.flatnonzero((gh != gh[0]) | (gw != gw[0]))
    if bad.size:
        i = int(bad[0])
        raise TrainDataError(f"{dataset_dir}: row {i} ({t.column('source_id')[i]}) has grid {gh[i]}x{gw[i]}, "
                             f"row 0 has {gh[0]}x{gw[0]}; one run trains on one grid")
    codes = t.column("codes").combine_chunks()
    flat = codes.values.to_numpy(zero_copy_only=False).astype(np.int32)
    if flat.size != len(t) * gh[0] * gw[0]:
        raise TrainDataError(f"{dataset_dir}: codes lengths do not match grid_h*grid_w={gh[0] * gw[0]}")

    def strings(name: str) -> list[str]:
        vals = t.column(name).to_pylist()
        for i, v in enumerate(vals):
            if v is None:
                raise TrainDataError(f"{dataset_dir}: row {i} ({t.column('source_id')[i]}) has no {name}; "
                                     "the Emu3 family is conditioned on text prompts")
        return vals

    def floats(name: str) -> np.ndarray:
        arr = t.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isfinite(arr).all():
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise TrainDataError(f"{dataset_dir}: row {i} has a non-finite {name}")
        return arr

    return TrainRows(
        codes=flat.reshape(len(t), int(gh[0]), int(gw[0])),
        prompt=strings("prompt"),
        neg_prompt=strings("neg_prompt") if pairs else None,
        pos_null=t.column("pos_null").to_numpy(zero_copy_only=False).astype(bool) if pairs else None,
        neg_null=t.column("neg_null").to_numpy(zero_copy_only=False).astype(bool) if pairs else None,
        ref_logp_pos=floats("ref_logp_pos") if reference else None,
        ref_logp_neg=floats("ref_logp_neg") if reference else None,
        ref_logp_null=floats("ref_logp_null") if "ref_logp_null" in cols else None,
        source=str(dataset_dir),
        manifest=manifest,
    )


@dataclass(frozen=True)
class BatchPlan:
    """Deterministic map (optimizer step, rank, micro-step) -> row indices. Steps are 0-based."""

    num_rows: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def check(self, source: str) -> None:
        if self.steps_per_epoch < 1:
            raise TrainDataError(
                f"{source}: {self.num_rows} rows are fewer than one global batch of {self.global_batch} "
                f"(num_workers {self.world_size} x micro_batch_size {self.micro_batch_size} x grad_accum {self.grad_accum})")

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def rows(self, step: int, rank: int, micro: int, perm: np.ndarray | None = None) -> np.ndarray:
        """Row indices int64 [micro_batch_size] for one rank's micro-step of optimizer step `step`."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch) if perm is None else perm
        start = s * self.global_batch + (micro * self.world_size + rank) * self.micro_batch_size
        return perm[start : start + self.micro_batch_size]

    def step_fingerprint(self, step: int, perm: np.ndarray | None = None) -> int:
        """An integer that changes if step `step` consumed other rows; summed into the resume check."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch) if perm is None else perm
        rows = perm[s * self.global_batch : (s + 1) * self.global_batch]
        return int(((rows.astype(np.int64) + 1) * (step + 1)).sum() % (2**31 - 1))


def total_steps(plan: BatchPlan, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: `epochs` full passes, capped by max_steps."""
    n = epochs * plan.steps_per_epoch
    return min(n, max_steps) if max_steps is not None else n


@dataclass
class MicroBatch:
    """One rank's micro-batch, ready to encode. M rows.

    codes LongTensor[M, h, w]; pos_prompts / neg_prompts: M strings each ("" = null condition),
    neg_prompts None for sft; neg_is_null bool [M] (cca_cfg); ref_logp_* float32 [M] when precomputed.
    """

    codes: torch.Tensor
    pos_prompts: list[str]
    neg_prompts: list[str] | None
    neg_is_null: torch.Tensor | None
    ref_logp_pos: torch.Tensor | None
    ref_logp_neg: torch.Tensor | None
    rows: np.ndarray

    @property
    def num_images(self) -> int:
        return self.codes.shape[0]


def make_micro_batch(data: TrainRows, rows: np.ndarray, objective: str, *, cond_dropout: float = 0.0,
                     dropout_seed: tuple[int, ...] = (0,)) -> MicroBatch:
    """Select `rows` and build their conditions for `objective` (pure; no model).

    sft: each prompt becomes "" with probability cond_dropout, drawn from `dropout_seed` so a
    repeated step draws the same. cca_cfg: the data's pos_null/neg_null replace a condition by "",
    and a null negative is flagged in neg_is_null (it counts as a positive in the loss).
    """
    codes = torch.from_numpy(data.codes[rows]).long()
    pos = [data.prompt[i] for i in rows]
    neg = neg_null = None
    if objective == "sft":
        if cond_dropout > 0:
            drop = np.random.default_rng(list(dropout_seed)).random(len(rows)) < cond_dropout
            pos = ["" if d else p for p, d in zip(pos, drop)]
    elif objective in PAIRED_OBJECTIVES:
        if data.neg_prompt is None:
            raise TrainDataError(f"{data.source}: objective {objective} needs the pairs dataset (neg_prompt column)")
        neg = [data.neg_prompt[i] for i in rows]
        if objective == "cca_cfg":
            pos = ["" if n else p for p, n in zip(pos, data.pos_null[rows])]
            neg = ["" if n else p for p, n in zip(neg, data.neg_null[rows])]
            neg_null = torch.from_numpy(data.neg_null[rows].copy())
    else:
        raise ValueError(f"unknown objective {objective!r}")
    ref = (None, None)
    if data.ref_logp_pos is not None and neg is not None:
        ref_pos, ref_neg = data.ref_logp_pos[rows], data.ref_logp_neg[rows]
        if objective == "cca_cfg" and data.ref_logp_null is not None:
            ref_pos = np.where(data.pos_null[rows], data.ref_logp_null[rows], ref_pos)
            ref_neg = np.where(data.neg_null[rows], data.ref_logp_null[rows], ref_neg)
        ref = (torch.from_numpy(np.ascontiguousarray(ref_pos)), torch.from_numpy(np.ascontiguousarray(ref_neg)))
    return MicroBatch(codes, pos, neg, neg_null, ref[0], ref[1], rows)


def check_reference_columns(data: TrainRows | str | Path, objective: str) -> None:
    """Refuse precomputed columns that were scored with null masking for an objective that ignores it.
    `data`: rows in memory, or a pairs_ref dir (only its null flags are read: the driver's early check)."""
    if isinstance(data, (str, Path)):
        import pyarrow.parquet as pq

        files = sorted(Path(data).glob("*.parquet"))
        if objective == "cca_cfg" or not files or "ref_logp_null" in pq.read_schema(files[0]).names:
            return
        flags = [pq.read_table(f, columns=["pos_null", "neg_null"]) for f in files]
        data = TrainRows(codes=np.zeros((0, 1, 1), np.int32), prompt=[], source=str(data),
                         pos_null=np.concatenate([t.column("pos_null").to_numpy(zero_copy_only=False) for t in flags]),
                         neg_null=np.concatenate([t.column("neg_null").to_numpy(zero_copy_only=False) for t in flags]),
                         ref_logp_pos=np.zeros(0, np.float32))
    if data.ref_logp_pos is None or data.ref_logp_null is not None or objective == "cca_cfg":
        return
    flagged = np.flatnonzero(data.pos_null | data.neg_null)
    if flagged.size:
        raise TrainDataError(
            f"{data.source}: ref_logp_pos/ref_logp_neg were scored with the CCA+CFG null flags applied (no "
            f"ref_logp_null column), so on {flagged.size} rows (first: row {int(flagged[0])}) they are not "
            f"log p_phi(x|c) as objective {objective} needs; use train.reference=online, data.null_prob=0, "
            "or a pairs_ref with a ref_logp_null column")
