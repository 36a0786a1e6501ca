"""Model families behind one protocol. MODEL_FAMILIES doubles as the CLI's choices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from cca_ray.models.base import ARVisualModel, Cond
from cca_ray.models.emu3 import SIDECAR, build_tiny_emu3, load_emu3

MODEL_FAMILIES = {"emu3": {"load": load_emu3, "build_tiny": build_tiny_emu3}}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _family(family: str) -> dict:
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family '{family}'; known: {', '.join(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[family]


def load_model(path, *, family: str | None = None, device="cpu", dtype=torch.float32, **kw) -> ARVisualModel:
    """Load a local checkpoint directory. The family comes from the checkpoint's sidecar when not given."""
    side = Path(path) / SIDECAR
    if family is None:
        family = json.loads(side.read_text()).get("family", "emu3") if side.exists() else "emu3"
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return _family(family)["load"](path, device=device, dtype=dtype, **kw)


def build_tiny_model(out_dir, model_cfg, codebook_size: int, prompts: Sequence[str] = ()) -> Path:
    """Random-init model of `model_cfg`'s size, saved under out_dir (used when model.path is None)."""
    return _family(model_cfg.family)["build_tiny"](
        out_dir,
        codebook_size=codebook_size,
        hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads,
        num_kv_heads=model_cfg.num_kv_heads,
        intermediate_size=model_cfg.intermediate_size,
        max_prompt_tokens=model_cfg.max_prompt_tokens,
        prompts=prompts,
        seed=model_cfg.seed,
    )


__all__ = ["ARVisualModel", "Cond", "MODEL_FAMILIES", "load_model", "build_tiny_model"]
