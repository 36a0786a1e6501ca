"""What each trainer rank feeds its model at each step: rows in memory, a deterministic plan, micro-batches.

Exact resume ("no step done twice or skipped") needs the data order to be a pure function of
the step number, so the trainer does not stream through a Ray Data iterator (whose split
between workers depends on timing). :class:`BatchPlan` maps (step, rank, micro-step) to row
indices, and a feed hands a rank the rows of each step: `MemoryFeed` (train.data_loading=memory)
indexes all rows held in memory (`read_rows`; codes are int32, Emu3 at 8,100 codes/image is
32 KB a row), `stream.StepFeed` (stream) reads only the rows of this rank's next steps:

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

from cca_ray.data.schema import DataError
from cca_ray.data.shards import read_dataset, read_manifest

PAIRED_OBJECTIVES = ("cca", "cca_cfg", "dpo", "unlearning")
UNPAIRED_OBJECTIVES = ("sft", "gft")  # one image and its (possibly dropped) condition per row
REFERENCE_OBJECTIVES = ("cca", "cca_cfg", "dpo")  # the ones that read log p_phi


class TrainDataError(DataError):
    """Training data that cannot be used; the message names the dataset dir and the row."""


@dataclass
class TrainRows:
    """A dataset's rows, in memory. N rows; codes of shape code_shape per row.

    codes int32 [N, *code_shape] ((h, w) for raster families, VAR's (680,) flat scales);
    cond: N raw conditions of the model family's kind (prompts for text families, class ids
    for class families); for pairs: neg_cond (N), pos_null and neg_null (bool [N]); for
    pairs_ref also the reference log-probs (float32 [N], nats): ref_logp_pos = log p_phi(x | c),
    ref_logp_neg = log p_phi(x | c_neg) (the real conditions, whatever the null flags say) and
    ref_logp_null = log p_phi(x | null). cca_cfg takes ref_logp_null where a flag replaced a
    condition by null (make_micro_batch); cca and dpo ignore the flags.
    """

    codes: np.ndarray
    cond: list
    neg_cond: list | None = None
    pos_null: np.ndarray | None = None
    neg_null: np.ndarray | None = None
    ref_logp_pos: np.ndarray | None = None
    ref_logp_neg: np.ndarray | None = None
    ref_logp_null: np.ndarray | None = None
    source: str = "<memory>"
    manifest: dict | None = None
    row_seeds: np.ndarray | None = None  # int64 [N], row_seeds(source_id): drop-path draws (VAR)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        """The image's code grid (h, w) (VAR: its last scale), which text families name in their prefix."""
        return tuple(int(g) for g in self.manifest["grid"]) if self.manifest else tuple(self.codes.shape[1:3])

    @property
    def num_codes(self) -> int:
        """Image tokens per row: what log p sums over."""
        return int(np.prod(self.codes.shape[1:]))

    def has(self, column: str) -> bool:
        """Whether these rows carry `column` (the reference log-probs are optional)."""
        return getattr(self, column) is not None

    @property
    def any_null_flag(self) -> bool:
        """Whether any row's pos_null/neg_null flag replaces a condition by null (cca_cfg)."""
        return self.pos_null is not None and bool((self.pos_null | self.neg_null).any())

    def take(self, rows: np.ndarray) -> TrainRows:
        """The rows `rows` (indices into these), in that order."""
        def pick(v):
            if v is None:
                return None
            return [v[i] for i in rows] if isinstance(v, list) else v[rows]

        return TrainRows(**{name: pick(getattr(self, name)) for name in _ROW_FIELDS},
                         source=self.source, manifest=self.manifest)


_ROW_FIELDS = ("codes", "cond", "neg_cond", "pos_null", "neg_null", "ref_logp_pos", "ref_logp_neg", "ref_logp_null",
               "row_seeds")


def dataset_for(objective: str, reference: str) -> str:
    """Which dataset dir under data_dir an objective reads."""
    if objective in UNPAIRED_OBJECTIVES:
        return "train"
    if objective == "unlearning":
        return "pairs"  # no reference at all
    return "pairs_ref" if reference == "precomputed" else "pairs"


def code_shape(manifest: dict) -> tuple[int, ...]:
    """The shape of one row's codes: the tokenizer's code_shape (VAR: [680]), else its grid."""
    tok = manifest.get("tokenizer") or {}
    return tuple(int(x) for x in (tok.get("code_shape") or manifest["grid"]))


def row_seeds(source_ids) -> np.ndarray:
    """One int64 seed per row from its source_id (stable across epochs, ranks, shard order): the drop-path
    draws of a family that trains with it (VAR), shared by the policy, the frozen reference and the
    precomputed reference pass, so log p_theta / p_phi is exactly 0 at step 0."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=4).digest(), "big")
                     for s in source_ids], dtype=np.int64)


def train_columns(pairs: bool, reference: bool, condition_kind: str = "prompt") -> list[str]:
    """The dataset columns training reads: codes, the condition of the model's kind (condition_kind "prompt":
    the prompt column, "label": the label column), source_id, and those of `pairs`/`reference`."""
    column = {"prompt": "prompt", "label": "label"}[condition_kind]
    cols = ["codes", column, "source_id"]
    cols += [f"neg_{column}", "pos_null", "neg_null"] if pairs else []
    cols += ["ref_logp_pos", "ref_logp_neg", "ref_logp_null"] if reference else []
    return cols


def missing_columns_error(dataset_dir, manifest: dict, names, cols: list[str],
                          reference: bool) -> TrainDataError | None:
    """The error for a dataset whose columns `names` lack some of `cols`, or None."""
    missing = [c for c in cols if c not in names]
    if not missing:
        return None
    return TrainDataError(f"{dataset_dir}: missing column(s) {', '.join(missing)} (a {manifest.get('dataset')} "
                          f"dataset; {'pairs_ref' if reference else 'pairs'} has them)")


def read_rows(dataset_dir: str | Path, *, pairs: bool, reference: bool, condition_kind: str = "prompt") -> TrainRows:
    """Read a dataset dir's shards into TrainRows (train.data_loading=memory; `stream.StreamedRows` streams them).

    `cca_ray.data.read_dataset` does the reading and the checks that name file and row (manifest,
    shards, columns of the dataset's schema, every row's codes against the tokenizer, row count);
    `rows_from_table` adds what training needs on top.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    cols = train_columns(pairs, reference, condition_kind)
    t = read_dataset(dataset_dir)
    err = missing_columns_error(dataset_dir, manifest, t.column_names, cols, reference)
    if err:
        raise err
    if len(t) == 0:
        raise TrainDataError(f"{dataset_dir}: no rows")
    # a column the reference pass left all null (ref_logp_null when no objective read it) is absent
    null_ref = reference and t.column("ref_logp_null").null_count < len(t)
    return rows_from_table(t.select(cols), manifest, str(dataset_dir), pairs=pairs, reference=reference,
                           condition_kind=condition_kind, null_reference=null_ref)


def rows_from_table(t, manifest: dict, source: str, *, pairs: bool, reference: bool, condition_kind: str,
                    null_reference: bool, row_numbers: np.ndarray | None = None) -> TrainRows:
    """An Arrow table of `train_columns` -> TrainRows, with the checks training needs: a condition of the
    model's kind on every row, finite reference log-probs (TrainDataError naming the row and source_id).

    null_reference: whether the dataset has a scored ref_logp_null column (a dataset-wide fact, so the
    streamed path, which sees a few row groups at a time, decides it as the in-memory one does);
    row_numbers: each table row's row number in the dataset, for messages (default 0..len-1).
    """
    column = {"prompt": "prompt", "label": "label"}[condition_kind]
    sids = t.column("source_id").to_pylist()
    number = (lambda i: int(row_numbers[i])) if row_numbers is not None else (lambda i: i)

    def conditions(name: str) -> list:
        vals = t.column(name).to_pylist()
        for i, v in enumerate(vals):
            if v is None:
                what = "text prompts" if condition_kind == "prompt" else "class labels"
                raise TrainDataError(f"{source}: row {number(i)} ({sids[i]}) has no {name}; this model family is "
                                     f"conditioned on {what}")
        return vals

    def floats(name: str) -> np.ndarray:
        arr = t.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isfinite(arr).all():
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise TrainDataError(f"{source}: row {number(i)} ({sids[i]}) has a non-finite {name} ({arr[i]})")
        return arr

    def flags(name: str) -> np.ndarray:
        return t.column(name).to_numpy(zero_copy_only=False).astype(bool)

    flat = t.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    return TrainRows(
        codes=flat.reshape(len(t), *code_shape(manifest)),
        cond=conditions(column),
        neg_cond=conditions(f"neg_{column}") if pairs else None,
        pos_null=flags("pos_null") if pairs else None,
        neg_null=flags("neg_null") if pairs else None,
        ref_logp_pos=floats("ref_logp_pos") if reference else None,
        ref_logp_neg=floats("ref_logp_neg") if reference else None,
        ref_logp_null=floats("ref_logp_null") if reference and null_reference else None,
        source=source,
        manifest=manifest,
        row_seeds=row_seeds(sids),
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

    def rank_rows(self, step: int, rank: int, perm: np.ndarray | None = None) -> np.ndarray:
        """All of one rank's rows of step `step`, micro-step after micro-step (grad_accum x micro_batch_size)."""
        perm = self.permutation(self.epoch_of(step)) if perm is None else perm
        return np.concatenate([self.rows(step, rank, micro, perm) for micro in range(self.grad_accum)])

    def step_fingerprint(self, step: int, perm: np.ndarray | None = None) -> int:
        """An integer that changes if step `step` consumed other rows; summed into the resume check."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch) if perm is None else perm
        rows = perm[s * self.global_batch : (s + 1) * self.global_batch]
        return int(((rows.astype(np.int64) + 1) * (step + 1)).sum() % (2**31 - 1))


class MemoryFeed:
    """train.data_loading=memory: every row is in memory and a step's micro-batches index them directly."""

    def __init__(self, data: TrainRows, plan: BatchPlan, rank: int):
        self.data, self.plan, self.rank = data, plan, rank
        self._perm: tuple[int, np.ndarray | None] = (-1, None)

    def step_rows(self, step: int) -> tuple[TrainRows, list[np.ndarray]]:
        """(rows to index, each micro-step's indices into them) for this rank's step `step`."""
        epoch = self.plan.epoch_of(step)
        if self._perm[0] != epoch:
            self._perm = (epoch, self.plan.permutation(epoch))
        return self.data, [self.plan.rows(step, self.rank, m, self._perm[1]) for m in range(self.plan.grad_accum)]

    def close(self) -> None:
        pass


def total_steps(plan: BatchPlan, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: `epochs` full passes, capped by max_steps."""
    n = epochs * plan.steps_per_epoch
    return min(n, max_steps) if max_steps is not None else n


@dataclass
class MicroBatch:
    """One rank's micro-batch, ready to encode. M rows.

    codes LongTensor[M, *code_shape]; pos_conds / neg_conds: M raw conditions each (None = the null
    condition), neg_conds None for sft; neg_is_null bool [M] (cca_cfg); ref_logp_* float32 [M] when precomputed.
    """

    codes: torch.Tensor
    pos_conds: list
    neg_conds: list | None
    neg_is_null: torch.Tensor | None
    ref_logp_pos: torch.Tensor | None
    ref_logp_neg: torch.Tensor | None
    rows: np.ndarray  # indices into the TrainRows it was made from
    row_seeds: torch.Tensor | None = None  # int64 [M]: TrainRows.row_seeds of these rows

    @property
    def num_images(self) -> int:
        return self.codes.shape[0]


def make_micro_batch(data: TrainRows, rows: np.ndarray, objective: str, *, cond_dropout: float = 0.0,
                     dropout_seed: tuple[int, ...] = (0,)) -> MicroBatch:
    """Select `rows` and build their conditions for `objective` (pure; no model).

    sft, gft: each condition becomes None (null) with probability cond_dropout, drawn from `dropout_seed`
    so a repeated step draws the same. cca_cfg: the data's pos_null/neg_null replace a condition by
    None, and a null negative is flagged in neg_is_null (it counts as a positive in the loss).
    """
    codes = torch.from_numpy(data.codes[rows]).long()
    pos = [data.cond[i] for i in rows]
    neg = neg_null = None
    if objective in UNPAIRED_OBJECTIVES:
        if cond_dropout > 0:
            drop = np.random.default_rng(list(dropout_seed)).random(len(rows)) < cond_dropout
            pos = [None if d else p for p, d in zip(pos, drop)]
    elif objective in PAIRED_OBJECTIVES:
        if data.neg_cond is None:
            raise TrainDataError(f"{data.source}: objective {objective} needs the pairs dataset (negative conditions)")
        neg = [data.neg_cond[i] for i in rows]
        if objective == "cca_cfg":
            pos = [None if n else p for p, n in zip(pos, data.pos_null[rows])]
            neg = [None if n else p for p, n in zip(neg, data.neg_null[rows])]
            neg_null = torch.from_numpy(data.neg_null[rows].copy())
    else:
        raise ValueError(f"unknown objective {objective!r}")
    ref = (None, None)
    if data.ref_logp_pos is not None and neg is not None:
        ref_pos, ref_neg = data.ref_logp_pos[rows], data.ref_logp_neg[rows]
        if objective == "cca_cfg":  # a condition the flags replaced by null is scored by p_phi(x | null)
            null_pos, null_neg = data.pos_null[rows], data.neg_null[rows]
            if data.ref_logp_null is None and (null_pos.any() or null_neg.any()):
                raise TrainDataError(f"{data.source}: objective cca_cfg needs the ref_logp_null column for rows "
                                     "whose pos_null/neg_null flag is set")
            if data.ref_logp_null is not None:
                ref_pos = np.where(null_pos, data.ref_logp_null[rows], ref_pos)
                ref_neg = np.where(null_neg, data.ref_logp_null[rows], ref_neg)
        ref = (torch.from_numpy(np.ascontiguousarray(ref_pos)), torch.from_numpy(np.ascontiguousarray(ref_neg)))
    seeds = torch.from_numpy(data.row_seeds[rows]) if data.row_seeds is not None else None
    return MicroBatch(codes, pos, neg, neg_null, ref[0], ref[1], rows, seeds)


def draw_knob(kind: str, n: int, seed: tuple[int, ...], lam_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Per-row knob values float32 [n], a pure function of `seed` (the step, rank and micro-step), so a
    resumed run draws what the interrupted one did: "lam" log-uniform over lam_range (λ-conditioned CCA),
    "beta" uniform on [0, 1) (GFT)."""
    u = np.random.default_rng([*seed, 0x6b6e6f62]).random(n)  # a stream of its own, apart from dropout's
    if kind == "lam":
        low, high = lam_range
        return torch.from_numpy(np.exp(np.log(low) + u * (np.log(high) - np.log(low)))).float()
    if kind == "beta":
        return torch.from_numpy(u).float()
    raise ValueError(f"unknown knob kind {kind!r}")


def check_reference_columns(data, objective: str) -> None:
    """Refuse rows that lack the precomputed log p_phi columns `objective` reads (train.reference=precomputed):
    ref_logp_pos/ref_logp_neg for cca, cca_cfg and dpo, and ref_logp_null for cca_cfg when any row is flagged.
    data: TrainRows or stream.StreamedRows (both answer `has` and `any_null_flag`)."""
    if objective not in REFERENCE_OBJECTIVES:
        return
    missing = [n for n in ("ref_logp_pos", "ref_logp_neg") if not data.has(n)]
    if objective == "cca_cfg" and data.any_null_flag and not data.has("ref_logp_null"):
        missing.append("ref_logp_null")
    if missing:
        raise TrainDataError(f"{data.source}: train.reference=precomputed with objective {objective} needs the "
                             f"{', '.join(missing)} column(s) of pairs_ref (the reference pass)")
