"""The one way this package reads a torch file: `weights_only=True`, errors as one line.

Checkpoints may come from elsewhere (a shared file system, a colleague); an unpickler that can build arbitrary
objects would let such a file run code. `weights_only=True` only rebuilds tensors and plain containers; the few
foreign classes a DeepSpeed checkpoint needs are allow-listed by name in `deepspeed_engine.py`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch


def safe_torch_load(path: str | Path, map_location: Any = "cpu", allowed: Iterable[type] = ()) -> Any:
    """torch.load(weights_only=True); a missing, truncated or foreign file raises ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file missing: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"checkpoint {path} holds objects that are not plain tensors/containers: "
                         f"{refused_global(err)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError, UnicodeDecodeError,
            AttributeError, IndexError) as err:
        # a text file or a truncated legacy pickle fails inside torch's legacy loader (e.g. KeyError: 101)
        raise ValueError(f"checkpoint {path} is truncated or not a torch file ({type(err).__name__})") from None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused_global(err: Exception) -> str:
    """What the weights-only unpickler refused, e.g. `a pickled posix.system (refused: only tensors and plain
    containers load)`; torch's message is several paragraphs."""
    m = _GLOBAL.search(str(err))
    if m:
        return f"a pickled {m.group(1)} (refused: only tensors and plain containers load)"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
