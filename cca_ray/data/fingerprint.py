"""checkpoint_id(path): a content hash that names a saved model (or VQ-VAE) checkpoint.

Recorded next to anything computed from a checkpoint (reference log-probs, codes) so a
later stage can refuse columns made by a different one.

Every byte of every config and weight file is hashed. Sampling a few MiB of a multi-GB
shard (what this did before) lets a fine-tune that changes few tensors, or only some rows
of one (a visual-only head changes 32,768 of lm_head's 184,622 rows), pass as the reference.
Cost: sha256 ran at 1.6 GB/s on one core here and files hash in parallel threads (hashlib
drops the GIL); 1 GiB in two page-cached files took 1.0 s on 2 busy cores. Emu3-Gen's ~17 GB
of safetensors is then bounded by the disk read, about what loading the weights costs once. Big files whose mtime is settled are memoised per process
by (path, size, mtime, inode), so the several checks of one run hash them once.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# config/tokenizer files and weights decide what a checkpoint computes; logs and READMEs do not
_CONTENT_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".npy", ".npz"}
_SKIP_NAMES = {"README.md", "trainer_state.json"}
_BLOCK = 8 * 2**20
_MEMO_MIN_BYTES = 64 * 2**20  # smaller files re-hash in milliseconds
_SETTLED_S = 2.0  # an mtime this old cannot be shared by a rewrite that follows (timestamps are coarse)
_memo: dict[tuple, str] = {}


def file_digest(f: Path) -> str:
    """sha256 hex digest of a file's full contents."""
    st = f.stat()
    key = (str(f), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _memo:
        return _memo[key]
    h = hashlib.sha256()
    with f.open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    digest = h.hexdigest()
    if st.st_size >= _MEMO_MIN_BYTES and time.time() - st.st_mtime > _SETTLED_S:
        _memo[key] = digest
    return digest


def checkpoint_id(path: str | Path) -> str:
    """'sha256:<16 hex>' over the names and full contents of a checkpoint dir's config and weight files
    (or of one file)."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and f.suffix in _CONTENT_SUFFIXES and f.name not in _SKIP_NAMES
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise FileNotFoundError(f"{p}: no config or weight files to identify the checkpoint")
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1, 8)) as pool:
        digests = list(pool.map(file_digest, files))
    h = hashlib.sha256()
    for f, d in zip(files, digests):
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{f.stat().st_size}:{d}\n".encode())
    return "sha256:" + h.hexdigest()[:16]
