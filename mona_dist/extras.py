"""The optional extras of pyproject.toml, and the one-line refusal when a task or engine needs a missing one.

The core install trains cls under DeepSpeed, FSDP or DDP. The OpenMMLab tasks and the fairscale engine need an
extra; each names it at start-up (`task coco needs mmdet: pip install -e '.[det]'`) instead of failing at its first
import mid-way. A leaf: it imports nothing of mona_dist, and looks modules up without importing them.
"""

from __future__ import annotations

import importlib.util

# extra -> the modules it installs that mona_dist imports, the main one first (the package names are pyproject's).
EXTRAS: dict[str, tuple[str, ...]] = {
    "seg": ("mmseg", "mmengine", "mmcv", "ftfy", "regex"),  # mmseg imports ftfy and regex without declaring them
    # the detectors take our backbone from mmseg's registry (`mmseg.MonaSwin`): mmseg too; COCO AP by pycocotools
    "det": ("mmdet", "mmseg", "mmengine", "mmcv", "pycocotools", "shapely", "six", "terminaltables", "ftfy", "regex"),
    "fairscale": ("fairscale",),
}


class MissingExtra(ValueError):
    """A module of an optional extra is not installed. A ValueError: `mona-dist` prints it as one line, exit 2."""


def missing(extra: str) -> str | None:
    """The first module of `extra` that cannot be imported here, or None."""
    for module in EXTRAS[extra]:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ValueError:  # a module in sys.modules without a __spec__: present
            pass
    return None


def require(what: str, extra: str) -> None:
    """Raise MissingExtra ("<what> needs <module>: pip install -e '.[<extra>]'") unless `extra` is installed."""
    module = missing(extra)
    if module is not None:
        raise MissingExtra(f"{what} needs {module}: pip install -e '.[{extra}]'")
