"""Versions of model, SAE and probe files: what a response's ``versions`` report when a backend has none."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Files up to this size are hashed whole by :func:`fingerprint`; larger ones by size and first MiB.
FINGERPRINT_FULL_BYTES = 16 * 1024 * 1024


def fingerprint(path: str | None) -> str:
    """A version for a local file or directory: a short hash of file names and contents (files over
    16 MiB: size and first MiB). Hub ids are their own version; None or empty gives ""."""
    if not path:
        return ""
    root = Path(path)
    if not root.exists():
        return path
    digest = hashlib.sha256()
    for f in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root).as_posix() if f != root else f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(size if size <= FINGERPRINT_FULL_BYTES else 1 << 20))
    return digest.hexdigest()[:12]


__all__ = ["FINGERPRINT_FULL_BYTES", "fingerprint"]
