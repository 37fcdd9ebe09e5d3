"""Shard index files and shard-spec resolution.

A writer leaves `<prefix>.index.json` beside `<prefix>-000000.tar ...`:

    {"format": "mona-dist-shards/1", "task": "coco", "complete": true, "total": 118287,
     "classes": [{"id": 1, "name": "person"}, ...],          # cls/voc/ade20k: a list of names (or null)
     "shards": [{"name": "train-000000.tar", "count": 512, "bytes": 99834880}, ...],
     "plan": "<hash of the shard plan>", "planned": 232}

Loaders use the per-shard counts to split an epoch exactly across ranks and workers, and the class list to map
COCO category ids to contiguous labels.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Optional

INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "mona-dist-shards/1"
_SHARD_NAME = re.compile(r"^(?P<prefix>.*)-(?P<num>\d+)\.tar$")
_SYNTHETIC = re.compile(r"(?:^|/)data/synthetic/(?P<task>cls|seg|ade20k|coco|voc)(?:/|$)")
_REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|pipe:)")


@dataclass(frozen=True)
class ShardSet:
    """What a shard spec resolved to: the shard URLs, their sample counts (None if unknown) and index metadata."""

    spec: str
    urls: list[str]
    counts: Optional[list[int]]
    index: Optional[dict[str, Any]]

    @property
    def classes(self) -> Optional[list]:
        return None if self.index is None else self.index.get("classes")

    @property
    def total(self) -> Optional[int]:
        return None if self.counts is None else sum(self.counts)


def index_path(prefix: str) -> str:
    return prefix + INDEX_SUFFIX


def shard_name(prefix: str, num: int) -> str:
    return f"{os.path.basename(prefix)}-{num:06d}.tar"


def read_index(path: str) -> dict[str, Any]:
    if _REMOTE.match(path):
        import webdataset as wds

        with wds.gopen(path, "rb") as stream:
            data = json.loads(stream.read())
    else:
        with open(path) as f:
            data = json.load(f)
    if data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a mona-dist shard index (format {data.get('format')!r})")
    return data


def write_index(path: str, data: dict[str, Any]) -> None:
    """Atomic: a crash mid-write leaves the previous index, never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"format": INDEX_FORMAT, **data}, f, indent=1)
        os.replace(tmp, path)
    except OSError as err:
        from mona_dist.disk import DiskFull, is_disk_full, remove

        problem = DiskFull(path) if is_disk_full(err, os.path.dirname(os.path.abspath(path))) else None
        remove(tmp)
        if problem is not None:
            raise problem from None
        raise


def missing_message(spec: str, what: str) -> str:
    """One line; under data/synthetic/<task>/ it names the command that writes the shards."""
    msg = f"{what}: {spec}"
    m = _SYNTHETIC.search(spec.replace(os.sep, "/"))
    if m:
        msg += f" (make it with: mona-dist shards synthetic --task {m['task']} --out data/synthetic/{m['task']})"
    return msg


def count_tar_samples(path: str) -> int:
    """Samples in a local tar = runs of consecutive members sharing a key (webdataset's grouping rule)."""
    from webdataset.tariterators import base_plus_ext

    count, last = 0, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _ = base_plus_ext(member.name)
            if member.isreg() and key is not None and key != last:
                count, last = count + 1, key
    return count


def _from_index(spec: str, path: str) -> ShardSet:
    data = read_index(path)
    base = os.path.dirname(path) if not _REMOTE.match(path) else path.rsplit("/", 1)[0]
    shards = data["shards"]
    if not shards:
        raise FileNotFoundError(missing_message(spec, "index lists no finished shards"))
    urls = [os.path.join(base, s["name"]) if not _REMOTE.match(base) else f"{base}/{s['name']}" for s in shards]
    return ShardSet(spec, urls, [int(s["count"]) for s in shards], data)


def _matching_index(urls: list[str], local: bool) -> Optional[dict[str, Any]]:
    """The writer's index for these shards, if one sits beside the first shard and lists every one of them."""
    m = _SHARD_NAME.match(urls[0])
    if not m:
        return None
    path = index_path(m["prefix"])
    if local and not os.path.exists(path):
        return None
    try:
        data = read_index(path)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    by_name = {s["name"]: int(s["count"]) for s in data["shards"]}
    if not all(os.path.basename(u) in by_name for u in urls):
        return None
    return {**data, "_counts": [by_name[os.path.basename(u)] for u in urls]}


def resolve_shards(spec: str) -> ShardSet:
    """Turn a shard spec into URLs + counts, or raise FileNotFoundError with one line saying what is missing."""
    import webdataset as wds

    if not spec:
        raise ValueError("empty shard spec")
    if _REMOTE.match(spec):
        piped = "pipe:" in spec
        if spec.endswith(INDEX_SUFFIX):
            if piped:  # would run the command here, in the trainer; commands run only in the loader workers
                raise ValueError(f"{spec}: a pipe: index is not read (it would run a command in the trainer); "
                                 "name the shards instead, or give the index as a file or URL")
            return _from_index(spec, spec)
        urls = wds.shardlists.expand_urls(spec)
        found = None if piped else _matching_index(urls, local=False)
        return ShardSet(spec, urls, found.pop("_counts") if found else None, found)

    path = os.path.expanduser(spec)
    if path.endswith(INDEX_SUFFIX):
        if not os.path.isfile(path):
            raise FileNotFoundError(missing_message(spec, "no such shard index"))
        return _from_index(spec, path)
    if os.path.isdir(path):
        indexes = sorted(glob.glob(os.path.join(path, "*" + INDEX_SUFFIX)))
        if len(indexes) != 1:
            raise FileNotFoundError(
                missing_message(spec, f"directory holds {len(indexes)} *{INDEX_SUFFIX} files, name one")
            )
        return _from_index(spec, indexes[0])

    urls: list[str] = []
    for part in wds.shardlists.expand_urls(path):
        if glob.has_magic(part):
            urls.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part):
            urls.append(part)
        elif os.path.exists(os.path.dirname(part) or "."):
            raise FileNotFoundError(missing_message(spec, f"missing shard {part} in"))
        else:
            break
    if not urls:
        raise FileNotFoundError(missing_message(spec, "no shards match"))
    found = _matching_index(urls, local=True)
    if found:
        return ShardSet(spec, urls, found.pop("_counts"), found)
    return ShardSet(spec, urls, [_counted(u, spec) for u in urls], None)


def _counted(url: str, spec: str) -> int:
    try:
        return count_tar_samples(url)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{spec}: {url} is not a readable tar file ({str(err) or type(err).__name__}); without an "
                         f"index every shard is counted at start-up: fix or remove it, or write the shards with "
                         f"`mona-dist shards` (an index lets the loader skip a broken shard)") from None
