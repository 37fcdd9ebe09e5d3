"""A full disk, named as such: "no space left on device: <path> (<N> MiB free)".

torch.save onto a full disk raises `[enforce fail at inline_container.cc:672] unexpected pos ...` (after
`basic_ios::clear: iostream error`), never ENOSPC; safetensors and plain writes raise OSError 28. Writers that can
fill a disk (checkpoints, shards) turn either into `DiskFull` and remove what they had half written.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# torch's C++ writer reports a short write with these words (caffe2/serialize/inline_container.cc)
_TORCH_WRITE_FAILURES = ("unexpected pos", "iostream error", "file write failed", "PytorchStreamWriter failed")
_NEARLY_FULL = 64 << 20  # bytes: a torch write error with less than this free is a full disk


class DiskFull(OSError):
    def __init__(self, path: str | Path):
        self.path = str(path)
        super().__init__(errno.ENOSPC, f"no space left on device: {self.path} ({free_mib(self.path)} MiB free)")

    def __str__(self) -> str:
        return self.args[1]

    def __reduce__(self):  # crosses process pools (the shard writer's workers) as itself
        return (_rebuild, (self.path, self.args[1]))


def _rebuild(path: str, message: str) -> DiskFull:
    err = DiskFull.__new__(DiskFull)
    OSError.__init__(err, errno.ENOSPC, message)
    err.path = path
    return err


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on `path`'s file system (its nearest existing parent's); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def free_mib(path: str | Path) -> str:
    free = free_bytes(path)
    return "?" if free is None else str(free >> 20)


def is_disk_full(err: BaseException, path: str | Path) -> bool:
    """`err`, raised while writing under `path`, says (or is) a full disk."""
    if isinstance(err, DiskFull):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left on device" in text or "os error 28" in text:  # safetensors, libraries that re-wrap
        return True
    if isinstance(err, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURES):
        free = free_bytes(path)
        return free is not None and free < _NEARLY_FULL
    return False


def remove(path: str | Path) -> None:
    """Best effort: a half-written file or directory goes, so that the disk is not left full."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.unlink(p)
        except OSError:
            pass
