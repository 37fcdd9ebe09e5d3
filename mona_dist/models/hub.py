"""Pretrained weights by name: timm pretrained tags and Hugging Face hub repos, resolved to a local file.

    swin_large_patch4_window7_224.ms_in22k          a timm pretrained tag (its pretrained_cfg names the hub repo)
    swin_large_patch4_window7_224                   timm's default tag for that architecture
    timm/swin_large_patch4_window7_224.ms_in22k     the hub repo itself
    hf-hub:timm/swin_large_patch4_window7_224.ms_in22k[@REVISION]

A path that exists always wins. The file comes from `huggingface_hub.hf_hub_download` (its cache layout, file locks,
revisions), `model.safetensors` first, then `pytorch_model.bin`, as timm tries them; then the local-file loader
(pretrained.py) reads it like any other file.

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE once, when it is imported (timm imports it); they are
read here again at every call, with the same precedence, and passed on, so a process that sets them after importing
mona_dist (a notebook, a test) is honoured too. tests/models/test_hub.py fails if huggingface_hub's precedence
changes. Offline, a file missing from the cache fails at once; online without a network huggingface_hub retries
5 times (30-50 s) before it gives up, and then the one file name is not tried again with the next.
"""

from __future__ import annotations

import os
from pathlib import Path

# timm's order (timm.models._hub.load_state_dict_from_hf): safetensors when the repo has it, else the torch file.
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub would use if it were imported now (constants.HF_HUB_CACHE's rule)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE


def hub_source(name: str) -> tuple[str, str | None, tuple[str, ...]] | None:
    """(repo_id, revision, file names to try) that `name` means on the hub, or None if it names nothing there."""
    if name.startswith("hf-hub:"):
        repo, _, revision = name.removeprefix("hf-hub:").partition("@")
        return repo, revision or None, HUB_FILENAMES
    cfg = _timm_cfg(name.removeprefix("timm/")) if name.count("/") <= 1 else None
    if name.startswith("timm/") and name.count("/") == 1:
        return name, None, _filenames(cfg)
    if "/" not in name and cfg is not None and cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        return repo, revision or None, _filenames(cfg)
    return None


def _timm_cfg(name: str):
    """timm's pretrained_cfg for an `arch[.tag]` name it knows, else None."""
    return _timm_lookup(name)[0]


def _timm_lookup(name: str):
    """(pretrained_cfg or None, timm's reason when it has none)."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name, allow_unregistered=False), ""
    except (RuntimeError, ValueError, KeyError) as err:  # an architecture or tag timm does not know
        return None, str(err)


def _filenames(cfg) -> tuple[str, ...]:
    return (cfg.hf_hub_filename,) if cfg is not None and cfg.hf_hub_filename else HUB_FILENAMES


def release_file(name: str) -> str | None:
    """The original release's file name behind a timm tag (its pretrained_cfg url), e.g.
    swin_large_patch4_window7_224.ms_in22k -> swin_large_patch4_window7_224_22k.pth; None for other names."""
    cfg = _timm_cfg(name.removeprefix("timm/")) if not name.startswith("hf-hub:") else None
    return os.path.basename(cfg.url) if cfg is not None and cfg.url else None


def resolve_pretrained(name: str | Path) -> Path:
    """The local file that `model.pretrained: name` means: the path itself if it exists, else the file of the timm
    tag / hub repo it names, from the hub cache (downloaded there unless HF_HUB_OFFLINE). Anything else is one
    FileNotFoundError line naming `name` (and the cache directory searched)."""
    path = Path(name)
    if path.exists():
        return path
    source = hub_source(str(name))
    if source is None:
        why = _timm_lookup(str(name))[1] if "/" not in str(name) else ""
        tag = f"; timm: {why}" if why.startswith("Invalid pretrained tag") else ""
        raise FileNotFoundError(f"pretrained file not found: {name} (neither a local file nor a timm pretrained tag, "
                                f"timm/<name> or hf-hub:<repo>{tag})")
    return _download(str(name), *source)


def _download(name: str, repo: str, revision: str | None, filenames: tuple[str, ...]) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    cache, offline = hub_cache_dir(), hub_offline()
    where = f"Hugging Face cache {cache}" + (" (HF_HUB_OFFLINE=1)" if offline else "")
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=offline))
        except LocalEntryNotFoundError as err:
            if not offline:  # online, the hub could not be reached (after its retries) and the cache lacks the file
                why = str(err).splitlines()[0]
                raise FileNotFoundError(f"model.pretrained: {name}: {repo} is not in the {where} and the hub "
                                        f"could not be reached ({why})") from None
            continue  # offline: this file is not cached; the next name may be
        except EntryNotFoundError:  # the hub repo has no such file
            continue
        except HFValidationError as err:
            raise FileNotFoundError(f"model.pretrained: {name}: {repo!r} is not a hub repo name ({err})") from None
        except (HfHubHTTPError, OSError) as err:  # no such repo, no access, a full disk
            why = str(err).splitlines()[0]
            raise FileNotFoundError(f"model.pretrained: {name}: could not fetch {repo} into the {where}: "
                                    f"{why}") from None
    files = " or ".join(filenames)
    raise FileNotFoundError(f"model.pretrained: {name}: no {files} of hub repo {repo} in the {where}")
