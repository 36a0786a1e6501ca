"""Weights across ZeRO-3 ranks: loaded partitioned, and exported by the ranks themselves (no consolidation).

`load_partitioned`: every rank builds the model from its config under `deepspeed.zero.Init`, so it holds
only its partition; rank 0 alone reads the weights (one host copy per node, not one per rank) and fills
each parameter through `GatheredParameters(modifier_rank=0)`, which hands every rank its slice.

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


def load_partitioned(model_dir, load_options: dict, *, dtype: torch.dtype, ds_config: dict, rank: int):
    """Collective: the adapter of `model_dir` with every parameter a ZeRO-3 partition holding the checkpoint's
    values. Only rank 0 reads the weights (load_model); the others build the modules from the config alone."""
    import deepspeed

    from cca_ray.models import knob as knobs, load_model

    if dist.is_initialized():  # deepspeed.comm over the rank's group (zero.Init reads the world size from it)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    with torch.device("meta"):  # every lazy import first (torch._dynamo's fails inside zero.Init's patching)
        load_model(model_dir, **load_options, dtype=dtype, weights=False)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        adapter = load_model(model_dir, **load_options, device="cpu", dtype=dtype, weights=False)
    if Path(model_dir).is_dir():
        knobs.load(adapter.module, model_dir)  # a knob model's small embedder: read on every rank (replicated)
    params, buffers, problem, error = {}, {}, None, None
    if rank == 0:
        try:
            full = load_model(model_dir, **load_options, device="cpu", dtype=dtype)
            params, buffers = dict(full.module.named_parameters()), dict(full.module.named_buffers())
            del full  # rank 0 frees the host copy tensor by tensor below (params/buffers hold the last references)
            ours = {n for n, _ in adapter.module.named_parameters()}
            if ours != params.keys():
                problem = (f"{model_dir}: the model built from its config has other parameters than the loaded one "
                           f"(only built: {sorted(ours - params.keys())[:5]}, only loaded: "
                           f"{sorted(params.keys() - ours)[:5]})")
        except Exception as e:  # noqa: BLE001 (re-raised below, on every rank: the others would wait forever)
            problem, error = f"{type(e).__name__}: {e}", e
    problem = broadcast_result(problem, rank)
    if problem is not None:
        if error is not None:
            raise error
        raise RuntimeError(problem if rank == 0 else f"rank 0 could not load {model_dir}: {problem}")
    for name, p in adapter.module.named_parameters():
        src = params.pop(name, None)
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(src)
        else:
            _broadcast_into(p.data, src, rank)
    for name, b in adapter.module.named_buffers():
        _broadcast_into(b, buffers.get(name), rank)
    return adapter


def _broadcast_into(dst: torch.Tensor, src: torch.Tensor | None, rank: int) -> None:
    """dst on every rank := rank 0's src (a replicated tensor: a buffer, a parameter outside zero.Init)."""
    with torch.no_grad():
        if rank == 0:
            dst.copy_(src)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = _object_device()
            t = dst.to(dev) if dev is not None else dst
            dist.broadcast(t, src=0)
            if t is not dst:
                dst.copy_(t)


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
