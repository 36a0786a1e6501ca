"""Exports written by the training ranks themselves, from the weights they hold (no consolidation).

Under ZeRO-3 no rank holds the whole model: `export_weights` has every rank enter
`Trainer.gathered_weights()` (a collective all-gather), rank 0 write the full weights through the
same writer as the driver's export (cca_ray.train.checkpoint.write_export: the family's layout, in
model.dtype) and every rank leave only once the directory is complete. Two users:

- the FID proxy (cca_ray.tune.sweep.FidProxy) samples `<run_dir>/proxy_export` in Ray tasks, so no
  training rank ever samples a partition, and every rank gets the result through `broadcast_result`;
- the final export: at the last step the workers write `<run_dir>/export` (rank 0 is a GPU rank under
  train.use_gpu), and the driver reuses it when its recorded step is the final checkpoint's, instead of
  rebuilding fp32 weights from every rank's optimizer shard in its own memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from cca_ray.train import checkpoint as ckpt

PROXY_EXPORT = "proxy_export"
FINAL_EXPORT = "export"


def export_weights(trainer, out_dir: str | Path) -> Path:
    """Collective: every rank of `trainer` calls it. Rank 0 writes the current weights as a `load_model`-able
    directory (model.dtype) with the step it holds in SOURCE_FILE; all ranks return when it is in place."""
    from cca_ray.models import knob as knobs, loader_options

    cfg = trainer.cfg
    with trainer.gathered_weights():
        if trainer.rank == 0:
            state = {k: v.detach() for k, v in trainer.engine.module.state_dict().items()}
            knob = {"knob": knobs.spec_to_dict(trainer.knob), "condition_dim": trainer.adapter.condition_dim}
            ckpt.write_export(state, trainer.model_dir, out_dir, dtype=cfg.model.dtype,
                              load_options=loader_options(cfg.model, trainer.model_dir), trained=knob,
                              source={"step": trainer.step, "written_by": "training ranks"})
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir)


def holds_full_precision(trainer) -> bool:
    """Whether the weights the ranks hold are as precise as model.dtype: a bf16 run exported as float32 must
    come from the fp32 master weights in the optimizer shards (the driver's consolidation), not from bf16."""
    return not (trainer.tc.bf16 and trainer.cfg.model.dtype == "float32")


def broadcast_result(obj, rank: int):
    """Rank 0's `obj` on every rank (the others pass None): one report value for the whole group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def _object_device() -> torch.device | None:
    """broadcast_object_list's staging device: the rank's GPU under NCCL, None (CPU) under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def reusable_export(run_dir: str | Path, step: int) -> Path | None:
    """The workers' final export in `run_dir` if it holds `step` (the final checkpoint's), else None (e.g. a
    run resumed from an older checkpoint past which nothing was exported)."""
    out = Path(run_dir) / FINAL_EXPORT
    return out if ckpt.export_source(out).get("step") == step else None
