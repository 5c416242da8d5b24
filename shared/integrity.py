"""SHA-256 digests of the files of a model folder or a checkpoint, written with the files and checked on load.

A folder's `SHA256SUMS` has one line `<hex digest>  <file name>` per file, the format of coreutils' `sha256sum`,
so `cd FOLDER && sha256sum -c SHA256SUMS` checks it too. A file changed, truncated or damaged after it was
written no longer matches its digest, and loading stops with an error that names the file instead of crashing
in the weights reader or, worse, loading a silently wrong model. The digests guard against damage (a disk
error, a half-finished copy), not against someone who can rewrite the folder: they could rewrite SHA256SUMS too.
A line may only name a plain file of the folder itself (no path separator, no `..`, nothing absolute): a damaged
or hostile `SHA256SUMS` never makes fedcvr open a file outside the folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

DIGESTS = "SHA256SUMS"
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A file of a model folder or checkpoint does not match the digest written with it."""


def file_digest(path: Path) -> str:
    """The SHA-256 digest of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_digests(folder: Path, names: Iterable[str]) -> Path:
    """Write `folder/SHA256SUMS` for the named files of `folder` (those that exist); returns its path."""
    folder = Path(folder)
    lines = [f"{file_digest(folder / name)}  {name}\n" for name in sorted(set(names)) if (folder / name).is_file()]
    target = folder / DIGESTS
    target.write_text("".join(lines), encoding="utf-8")
    return target


def _plain_name(name: str) -> bool:
    """A file name of the folder itself: not empty, no separator, no `.`/`..`, no control character, no padding."""
    return (bool(name) and name not in (".", "..") and name == name.strip()
            and not any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name))


def read_digests(folder: Path, error: type[Exception] = IntegrityError) -> dict[str, str]:
    """file name -> digest from `folder/SHA256SUMS`; `error` when it is missing or malformed."""
    path = Path(folder) / DIGESTS
    if not path.is_file():
        raise error(f"{path} is missing: the folder's files cannot be checked. It was written by a fedcvr "
                    "before digests were kept, or the file was lost: copy the whole folder again from where it "
                    "was written, or write it anew (train again, or resume from an intact checkpoint).")
    digests: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        parts = line.split("  ", 1)
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdef" for c in parts[0]):
            raise error(f"{path}, line {number}: {line[:80]!r} is not '<sha256 hex>  <file name>'; the digest "
                        "file is damaged: copy the whole folder again from where it was written.")
        if not _plain_name(parts[1]):
            raise error(f"{path}, line {number}: {parts[1][:80]!r} is not a plain file name of {Path(folder)} (a "
                        "digest file lists only the folder's own files, never a path): the digest file is damaged "
                        "or was tampered with; copy the whole folder again from where it was written.")
        digests[parts[1]] = parts[0]
    return digests


def verify_digests(folder: Path, required: Iterable[str], error: type[Exception] = IntegrityError) -> None:
    """Check every file listed in `folder/SHA256SUMS` against its digest, and that each `required` file is
    listed; raise `error` naming the first file that fails and how to recover."""
    folder = Path(folder)
    digests = read_digests(folder, error)
    unlisted = [name for name in required if name not in digests]
    if unlisted:
        raise error(f"{folder / DIGESTS} lists no digest for {', '.join(unlisted)}: the folder was not written "
                    "as one piece; copy the whole folder again from where it was written.")
    for name, expected in sorted(digests.items()):
        path = folder / name
        if not path.is_file():
            raise error(f"{path} is missing, but {DIGESTS} lists it: the folder is incomplete; copy the whole "
                        "folder again from where it was written.")
        found = file_digest(path)
        if found != expected:
            raise error(f"{path} does not match its SHA-256 digest in {DIGESTS} (expected {expected[:16]}..., "
                        f"found {found[:16]}..., {path.stat().st_size:,} bytes): the file was changed, truncated "
                        "or damaged after it was written. Copy it again from where it was written, or write it "
                        "anew (train again, or resume from an intact checkpoint).")
