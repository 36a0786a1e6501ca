"""The main job's step cache: every step's output under the workdir, keyed by the config fields that produced it.

A step writes `<name>.step.json` next to its output: {"key": sha256 of its inputs, "inputs": ..., "result": ...}.
A rerun with the same inputs reads `result` back and skips the step; a changed field changes the key of
that step and of every step that takes its output as an input (the output's key is part of theirs), so
only those are recomputed.

    key = step_key(cfg, ("model", "data", "tokenizer", "pretrain"), base=base_id)
    rows = cached(marker, key)
    if rows is None:
        rows = compute(); store(marker, key, rows)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cca_ray.config import Config
from cca_ray.fs import write_text_atomic

MARKER_SUFFIX = ".step.json"


def step_inputs(cfg: Config, sections: tuple[str, ...], **extra: Any) -> dict:
    """The config sections a step reads (workdir-independent: paths inside them are inputs too) plus extras."""
    dumped = cfg.model_dump(mode="json")
    out = {s: dumped[s] for s in sections}
    out.update(extra)
    return out


def digest(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=_plain).encode()).hexdigest()[:16]


def step_key(cfg: Config, sections: tuple[str, ...], **extra: Any) -> str:
    """sha256 (16 hex) of step_inputs(cfg, sections, **extra)."""
    return digest(step_inputs(cfg, sections, **extra))


def marker_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + MARKER_SUFFIX)


def cached(output: str | Path, key: str) -> Any | None:
    """The recorded result of the step whose output is `output`, if it was produced under `key`; else None."""
    marker = marker_path(output)
    try:
        rec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return rec.get("result") if rec.get("key") == key else None


def _plain(obj: Any) -> Any:
    return obj.item() if hasattr(obj, "item") else str(obj)  # numpy scalars -> numbers, paths -> str


def store(output: str | Path, key: str, result: Any) -> Any:
    """Record that `output` was produced under `key` (written last, atomically: a step killed midway has none).
    Returns the result as a rerun will read it back (plain JSON values)."""
    text = json.dumps({"key": key, "result": result}, indent=1, default=_plain)
    write_text_atomic(marker_path(output), text)
    return json.loads(text)["result"]
