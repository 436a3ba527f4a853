"""Atomic writes, checksums and strict JSON: the one place every artifact writer and fingerprint uses.

Every write goes to a temporary file in the target's folder and is renamed over the target, so a reader (or a
crash, even SIGKILL) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (setting it is the only way), then restore it


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the mode a plain open() would give
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite(value: Any) -> Any:
    """A copy with NaN/inf floats as None and numpy values as Python ones, so the result is strict JSON."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return finite(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def write_json_atomic(path: str | os.PathLike, data: Any, sort_keys: bool = False) -> Path:
    """Write ``data`` as strict, indented JSON (NaN/inf become null) atomically."""
    text = json.dumps(finite(data), indent=2, default=_json_default, allow_nan=False, sort_keys=sort_keys)
    return atomic_write_text(path, text)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def canonical_sha256(data: Any) -> str:
    """SHA-256 of sorted-key compact JSON: the same content always gives the same hash."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# The first bytes of the file formats the project reads: a file whose name promises one of these but whose bytes
# are something else is named as such, instead of failing deep inside a reader with a misleading message.
_MAGIC = {".npz": (b"PK\x03\x04", b"PK\x05\x06"), ".npy": (b"\x93NUMPY",), ".parquet": (b"PAR1",),
          ".pt": (b"PK\x03\x04", b"\x80"), ".pth": (b"PK\x03\x04", b"\x80")}  # zip, or torch's legacy pickle stream


def file_kind_problem(path: str | os.PathLike) -> str | None:
    """None when ``path``'s first bytes match its extension's format (or the extension is not one checked here);
    otherwise a short description of what the file is instead, e.g. "a text file, not an .npz archive"."""
    path = Path(path)
    expected = _MAGIC.get(path.suffix.lower())
    if expected is None or not path.is_file():
        return None
    with open(path, "rb") as handle:
        head = handle.read(8)
    if any(head.startswith(magic) for magic in expected):
        return None
    if not head:
        return f"an empty file, not a {path.suffix} file"
    text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return f"{'a text' if text else 'a binary'} file starting {head!r}, not a {path.suffix} file"


def refuse_existing(path: str | os.PathLike, overwrite: bool, what: str = "output",
                    flag: str = "--overwrite") -> Path:
    """The one output rule of every verb: an existing ``path`` is replaced only with ``overwrite``.

    Call it before any work, so that a refused run costs nothing and leaves nothing behind. Raises
    ``FileExistsError`` (a user error: one ``error:`` line, exit 2) naming the path and both ways out.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{what} {path} already exists: pass {flag} to replace it, or choose another path")
    return path
