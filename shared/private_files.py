"""Secrets kept in files only their owner may read: a merchant's pseudonym key, the recommendation service's token."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def create_private(path: Path, content: bytes) -> bool:
    """Create `path` with mode 0600 holding `content`; False (nothing written) when it exists already, e.g. because
    another process made it meanwhile. The file is created exclusively, never opened with wider rights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(handle, "wb") as out:
        out.write(content)
    return True


def read_private(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of a secret file; `error` naming the file, its mode and the fix when others may read it (`what`
    names the secret in the message, e.g. "the pseudonym key")."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise error(f"{path}: {what} is readable by other users (mode {mode:04o}); it must be private to its "
                    f"owner. fix: chmod 600 {path}")
    return path.read_bytes()
