"""Reading LlamaGen's released .pt files as they are, and checking them against a chosen size.

Layouts in the wild (all handled by `read_state_dict`):

* ``{"model": state_dict, ...}``: the DDP-trained c2i files (B, L, XL) and VQ-16; LlamaGen's own
  training script adds ``"optimizer"``, ``"steps"`` and its argparse ``"args"``.
* a bare state dict: the FSDP-trained files (XXL, 3B).
* ``{"module": ...}`` (DeepSpeed) and ``{"state_dict": ...}``, which LlamaGen's sampler accepts too.

Inside, a stale ``freqs_cis`` tensor (the RoPE table) may be present, and a model saved after
sampling carries its KV-cache buffers; neither is a weight, both are dropped.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

_WRAPPERS = ("model", "module", "state_dict")
_NOT_WEIGHTS = re.compile(r"^(freqs_cis|layers\.\d+\.attention\.kv_cache\.[kv]_cache)$")


def torch_load(path: Path):
    """torch.load on the CPU, memory-mapped where the file allows it, weights_only where it can be."""
    def load(weights_only: bool):
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as e:  # files from torch < 1.6 cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=weights_only)

    try:
        return load(weights_only=True)
    except pickle.UnpicklingError as e:
        # LlamaGen's train scripts pickle their argparse Namespace under "args", which the
        # weights-only unpickler refuses. Only for that case do we fall back to full unpickling
        # (it can run code from the file: load only checkpoints you trust); anything else the
        # safe loader refused stays an error.
        if "argparse.Namespace" not in str(e):
            raise ValueError(f"{path}: not a plain PyTorch checkpoint ({str(e).splitlines()[0]})") from None
        return load(weights_only=False)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The weights of a LlamaGen .pt file, and its stale freqs_cis table if it has one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (a state dict or {{'model': state_dict}}), got {type(obj).__name__}")
    for key in _WRAPPERS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    else:
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: neither a bare state dict nor one under {', '.join(map(repr, _WRAPPERS))}; "
                             f"top-level keys: {sorted(obj)[:8]}")
    freqs = obj.get("freqs_cis")
    return {k: v for k, v in obj.items() if not _NOT_WEIGHTS.match(k)}, freqs


def materialise(state: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    """Private copies on `device` in `dtype` (floating tensors only). Tensors straight from a
    memory-mapped file keep reading that file: a later save over it (say, into the directory the
    model came from) would corrupt the live weights or crash the process."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
            for k, v in state.items()}


def describe(state: dict[str, torch.Tensor]) -> str:
    """'dim 1024, 24 layers' from a GPT state dict, for error messages."""
    dim = state["tok_embeddings.weight"].shape[1] if "tok_embeddings.weight" in state else "?"
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    return f"dim {dim}, {len(layers)} layers"


def guess_size(state: dict[str, torch.Tensor], sizes: dict) -> str | None:
    """The registry name whose (dim, n_layer) matches the state dict, if exactly one does."""
    if "tok_embeddings.weight" not in state:
        return None
    dim = state["tok_embeddings.weight"].shape[1]
    n_layer = len({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    hits = [name for name, s in sizes.items() if s.dim == dim and s.n_layer == n_layer]
    return hits[0] if len(hits) == 1 else None


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], path, what: str, hint: str = "") -> None:
    """Raise ValueError naming the file when `state` does not have exactly the expected keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs {tuple(expected[k])}"
             for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches, e.g. {'; '.join(wrong[:3])}")
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    raise ValueError(f"{path}: does not match {what}: {'; '.join(parts)}{hint}")
