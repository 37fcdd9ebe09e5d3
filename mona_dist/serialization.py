"""The one way this package reads a torch file: `weights_only=True`, errors as one line.

Checkpoints may come from elsewhere (a shared file system, a colleague); an unpickler that can build arbitrary
objects would let such a file run code. `weights_only=True` only rebuilds tensors and plain containers; the few
foreign classes a DeepSpeed checkpoint needs are allow-listed by name in `deepspeed_engine.py`.
"""

from __future__ import annotations

import pickle
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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} holds objects that are not plain tensors/containers: {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"checkpoint {path} is truncated or not a torch file ({type(err).__name__})") from None
