"""Atomic writes: a reader sees the old file or directory, or the complete new one, never half of one.

Every stage writes its outputs through these (shards, manifests, tokenizers, exports, cached
results), so an interrupted run leaves nothing that a rerun could mistake for finished work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


def replace_dir(src: str | Path, dst: str | Path) -> Path:
    """Move the finished directory `src` to `dst`; an older `dst` is removed only after the move succeeded."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dst.exists():
        # rename onto a non-empty directory is refused: move the old one aside first
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh hidden temp dir beside `target`; on success it replaces `target` by rename.

    On an exception the temp dir is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def copy_dir_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy a directory so that `dst` is either absent, the old one, or complete."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file through a temp file beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
