"""Sharded DeepSpeed checkpoints (what Ray Train stores) and the consolidated export (what evaluate/serve load).

A Ray Train checkpoint directory, after Ray merged every rank's upload, looks like::

    checkpoint_000050/
      latest                        "ds" (DeepSpeed's pointer to the tag)
      ds/mp_rank_00_model_states.pt module weights (ZeRO 0-2) + client_state (step, epoch, ...)
      ds/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's optimizer/master-weight shard
      trainer_state.json            the same client_state, readable

Each rank writes only its own files into its own temp dir, so no shared filesystem is needed.
Resuming needs the same world size (ZeRO shards are per rank). An export is a family `save`
directory in model.dtype, written by `write_export`: normally by training rank 0 at the last step
from the gathered weights (cca_ray.train.gathered); `export_model` is the fallback that rebuilds
full fp32 weights from the shards with DeepSpeed's zero_to_fp32 (ZeRO >= 1) or reads the module
state (ZeRO 0) in the calling process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cca_ray.fs import atomic_dir

TAG = "ds"
STATE_FILE = "trainer_state.json"


def save_engine(engine, out_dir: str | Path, client_state: dict[str, Any], rank: int) -> None:
    """Every rank calls this (DeepSpeed's save is collective) with its own out_dir."""
    engine.save_checkpoint(str(out_dir), tag=TAG, client_state=client_state)
    if rank == 0:
        (Path(out_dir) / STATE_FILE).write_text(json.dumps(client_state, indent=1))


def load_engine(engine, ckpt_dir: str | Path) -> dict[str, Any]:
    """Restore weights, optimizer, LR scheduler; return the client_state saved with them."""
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir}: no DeepSpeed checkpoint with tag '{TAG}' could be loaded")
    return dict(client_state or {})


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def consolidated_state_dict(ckpt_dir: str | Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full weights of the wrapped module (names as in Emu3Scorer: 'hf....'), fp32 for ZeRO >= 1."""
    ckpt_dir = Path(ckpt_dir)
    if zero_stage == 0:
        states = torch.load(ckpt_dir / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)


SOURCE_FILE = "cca_ray_source.json"  # beside an export's weights: where they came from and the step they hold


def export_model(ckpt_dir: str | Path, model_dir: str | Path, out_dir: str | Path, *, zero_stage: int,
                 dtype: str = "float32", load_options: dict | None = None) -> Path:
    """Write a `load_model`-able directory from a sharded checkpoint: the architecture (and tokenizer)
    come from `model_dir` (the run's starting model, loaded with `load_options`: see
    cca_ray.models.loader_options), the weights from the checkpoint (consolidated here, in this process)."""
    trained = read_state(ckpt_dir) if (Path(ckpt_dir) / STATE_FILE).is_file() else {}
    return write_export(consolidated_state_dict(ckpt_dir, zero_stage), model_dir, out_dir, dtype=dtype,
                        load_options=load_options, trained=trained,
                        source={"checkpoint": str(ckpt_dir), "step": trained.get("step")})


def write_export(state: dict[str, torch.Tensor], model_dir: str | Path, out_dir: str | Path, *, dtype: str,
                 load_options: dict | None, trained: dict, source: dict) -> Path:
    """The one writer of an export, whoever holds the weights (the driver's consolidation, or training rank 0
    inside a ZeRO-3 gather: cca_ray.train.gathered): `state` (the trained module's names; any device and
    dtype) loaded into `model_dir`'s architecture in `dtype` and saved by the family, atomically.
    `trained` names the knob embedder a run attached (its checkpoint state); `source` goes to SOURCE_FILE."""
    from cca_ray.models import DTYPES, knob, load_model

    adapter = load_model(model_dir, **(load_options or {}), device="cpu", dtype=DTYPES[dtype])
    if knob.spec_of(adapter.module) is None and trained.get("knob"):  # the run attached a λ / β embedder
        knob.attach(adapter.module, int(trained["condition_dim"]), knob.spec_from_dict(trained["knob"]))
    result = adapter.module.load_state_dict(state, strict=False)
    trainable = {n for n, _ in adapter.module.named_parameters() if not n.startswith(adapter.frozen_prefixes)}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{source}: weights do not match {model_dir}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    adapter.module.to(DTYPES[dtype])
    with atomic_dir(out_dir) as tmp:
        adapter.save(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({**source, "base": str(model_dir), "dtype": dtype}))
    return Path(out_dir)


def export_source(export_dir: str | Path) -> dict:
    """What an export records about itself (SOURCE_FILE); {} when it has no record."""
    try:
        return json.loads((Path(export_dir) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def freeze_untrained(module: torch.nn.Module, frozen_prefixes: tuple[str, ...]) -> int:
    """requires_grad=False on the family's frozen_prefixes; returns the number of trainable parameters left."""
    n = 0
    for name, p in module.named_parameters():
        if name.startswith(frozen_prefixes):
            p.requires_grad_(False)
        elif p.requires_grad:
            n += p.numel()
    return n
