"""Parallel, resumable shard writing shared by every converter.

A converter turns its source into `SampleRef`s (small, picklable: file paths to copy byte-for-byte plus JSON/text
payloads). The shard plan is fixed up front from the refs and the source file sizes, so a re-run reproduces the
same plan and skips every shard the index already lists: each shard is written to a temporary name and renamed when
complete, then recorded in the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Optional

from mona_dist.disk import DiskFull, is_disk_full, remove

from .index import index_path, read_index, shard_name, write_index

log = logging.getLogger(__name__)
_TAR_HEADER = 512  # bytes per member header; members are padded to 512 too


@dataclass(frozen=True)
class SampleRef:
    """One sample to write: `files` maps extension -> source path (copied as is), `payload` extension -> str/dict."""

    key: str
    files: dict[str, str]
    payload: dict[str, Any] = field(default_factory=dict)

    def estimated_bytes(self) -> int:
        size = sum(os.path.getsize(p) for p in self.files.values())
        size += sum(len(v if isinstance(v, str) else json.dumps(v)) for v in self.payload.values())
        return size + (2 * _TAR_HEADER) * (len(self.files) + len(self.payload))


def plan_shards(refs: list[SampleRef], shard_size: Optional[float], per_shard: Optional[int]) -> list[list[SampleRef]]:
    """Group refs into shards by count or by estimated bytes (a shard closes once it reaches the target)."""
    if (shard_size is None) == (per_shard is None):
        raise ValueError("give exactly one of --shard-size (bytes) or --per-shard (samples)")
    if per_shard is not None:
        if per_shard < 1:
            raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
        return [refs[i : i + per_shard] for i in range(0, len(refs), per_shard)]
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be > 0 bytes, got {shard_size}")
    shards: list[list[SampleRef]] = [[]]
    size = 0
    for ref in refs:
        if shards[-1] and size >= shard_size:
            shards.append([])
            size = 0
        shards[-1].append(ref)
        size += ref.estimated_bytes()
    return shards if shards[0] else []


def _plan_hash(shards: list[list[SampleRef]]) -> str:
    h = hashlib.sha1()
    for shard in shards:
        for ref in shard:
            h.update(json.dumps([ref.key, sorted(ref.files.items()), ref.payload], sort_keys=True).encode())
        h.update(b"|")
    return h.hexdigest()


def _write_one(path: str, refs: list[SampleRef]) -> tuple[str, int, int]:
    """Runs in a worker process: write to a temporary name, rename when every sample is in."""
    import webdataset as wds

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with wds.TarWriter(tmp, mtime=0.0) as sink:  # fixed mtime: same source -> same bytes
            for ref in refs:
                sample: dict[str, Any] = {"__key__": ref.key}
                for ext, src in ref.files.items():
                    with open(src, "rb") as f:
                        sample[ext] = f.read()
                for ext, value in ref.payload.items():
                    sample[ext] = value if isinstance(value, str) else json.dumps(value)
                sink.write(sample)
        os.replace(tmp, path)
    except BaseException as err:
        problem = DiskFull(path) if is_disk_full(err, os.path.dirname(path)) else None  # before the space returns
        remove(tmp)  # never a half-written shard (nor a full disk) left behind
        if problem is not None:
            raise problem from None
        raise
    return os.path.basename(path), len(refs), os.path.getsize(path)


def write_shards(
    refs: list[SampleRef],
    prefix: str,
    *,
    task: str,
    classes: Optional[list],
    shard_size: Optional[float] = None,
    per_shard: Optional[int] = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `<prefix>-NNNNNN.tar` + `<prefix>.index.json`; returns the final index. Finished shards are kept."""
    from tqdm import tqdm

    if not refs:
        raise ValueError(f"no samples to write for {prefix}")
    shards = plan_shards(refs, shard_size, per_shard)
    plan = _plan_hash(shards)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    ipath = index_path(prefix)

    done: dict[str, dict] = {}
    if os.path.exists(ipath):
        old = read_index(ipath)
        if old.get("plan") == plan:
            for entry in old["shards"]:
                p = os.path.join(out_dir, entry["name"])
                if os.path.exists(p) and os.path.getsize(p) == entry["bytes"]:
                    done[entry["name"]] = entry
        else:
            log.warning("%s: source or sharding changed, rewriting every shard", ipath)
    names = [shard_name(prefix, i) for i in range(len(shards))]

    def save() -> dict[str, Any]:
        data = {
            "task": task,
            "complete": len(done) == len(shards),
            "total": sum(e["count"] for e in done.values()),
            "classes": classes,
            "planned": len(shards),
            "plan": plan,
            "shards": [done[n] for n in names if n in done],
        }
        write_index(ipath, data)
        return data

    todo = [i for i, n in enumerate(names) if n not in done]
    if done:
        log.info("%s: %d of %d shards already written, skipping them", prefix, len(done), len(shards))
    bar = tqdm(total=len(refs), initial=sum(len(shards[i]) for i in range(len(shards)) if names[i] in done),
               desc=os.path.basename(prefix), unit="img", disable=not progress)
    index = save()
    if workers <= 1 or len(todo) <= 1:
        results = (_write_one(os.path.join(out_dir, names[i]), shards[i]) for i in todo)
        for name, count, size in results:
            done[name] = {"name": name, "count": count, "bytes": size}
            index = save()
            bar.update(count)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_write_one, os.path.join(out_dir, names[i]), shards[i]) for i in todo]
            for fut in as_completed(futures):
                name, count, size = fut.result()
                done[name] = {"name": name, "count": count, "bytes": size}
                index = save()
                bar.update(count)
    bar.close()
    return index
