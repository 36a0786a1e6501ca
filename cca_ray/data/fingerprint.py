"""checkpoint_id(path): a content hash that names a saved model (or VQ-VAE) checkpoint.

Recorded next to anything computed from a checkpoint (reference log-probs, codes) so a
later stage can refuse columns made by a different one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# config/tokenizer files and weights decide what a checkpoint computes; logs and READMEs do not
_CONTENT_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".npy", ".npz"}
_SKIP_NAMES = {"README.md", "trainer_state.json"}
FULL_HASH_MAX_BYTES = 512 * 2**20  # bigger files: hash size + 16 evenly spaced 1 MiB samples
_SAMPLE = 2**20
_SAMPLES = 16


def _hash_file(h: "hashlib._Hash", f: Path) -> None:
    size = f.stat().st_size
    h.update(f"{f.name}:{size}\n".encode())
    with f.open("rb") as fh:
        if size <= FULL_HASH_MAX_BYTES:
            for block in iter(lambda: fh.read(8 * 2**20), b""):
                h.update(block)
            return
        # multi-GB shards (Emu3-Gen is ~17 GB): sampling keeps this to seconds; a fine-tuned
        # checkpoint changes nearly every tensor, so any sample sees the change
        for k in range(_SAMPLES):
            fh.seek((size - _SAMPLE) * k // (_SAMPLES - 1))
            h.update(fh.read(_SAMPLE))


def checkpoint_id(path: str | Path) -> str:
    """'sha256:<16 hex>' over the config and weight files of a checkpoint dir (or one file)."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and f.suffix in _CONTENT_SUFFIXES and f.name not in _SKIP_NAMES
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise FileNotFoundError(f"{p}: no config or weight files to identify the checkpoint")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        _hash_file(h, f)
    return "sha256:" + h.hexdigest()[:16]
