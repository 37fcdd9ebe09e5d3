"""The webdataset pitfalls wds_compat.py works around: upstream still behaves so, and our path does not."""

from __future__ import annotations

import os

import pytest
import webdataset as wds

from mona_dist.data import resolve_shards
from mona_dist.data.loader import ShardLoader
from mona_dist.data.wds_compat import SkipCounter, iter_shard, shuffled


def test_upstream_resampled_still_applies_the_node_splitter(synth, monkeypatch):
    # Pitfall 1+2: with RANK/WORLD_SIZE set, WebDataset(resampled=True) refuses without an explicit nodesplitter.
    # If this starts passing, upstream fixed it and wds_compat.py can shrink.
    urls = resolve_shards(os.path.join(synth("cls"), "shards", "train.index.json")).urls
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = wds.WebDataset(urls, resampled=True, shardshuffle=False)
    with pytest.raises(ValueError, match="explicit nodesplitter"):
        next(iter(ds))


def test_loader_ignores_rank_environment(synth, monkeypatch):
    # Pitfall 2: our loader takes rank/world size as arguments only.
    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "WORKER": "1", "NUM_WORKERS": "3", "WDS_SEED": "9"}.items():
        monkeypatch.setenv(name, value)
    shards = resolve_shards(os.path.join(synth("cls"), "shards", "val.index.json"))
    loader = ShardLoader(shards, lambda s: s["__key__"], list, train=False, rank=0, world_size=1, seed=0,
                         batch_size=4, workers=0)
    assert [k for b in loader for k in b] == [f"{i:08d}" for i in range(9)]


def test_iter_shard_reads_only_its_range(synth):
    url = resolve_shards(os.path.join(synth("cls"), "shards", "train.index.json")).urls[1]  # samples 7..13
    skips = SkipCounter()
    assert [s["__key__"] for s in iter_shard(url, 2, 5, skips=skips)] == ["00000009", "00000010", "00000011"]
    assert len(list(iter_shard(url, skips=skips))) == 7 and skips.shards == 0


def test_unopenable_shard_is_counted_not_raised(tmp_path):
    skips = SkipCounter()
    assert list(iter_shard(str(tmp_path / "gone.tar"), skips=skips)) == []
    assert skips.shards == 1


def test_pipe_urls_work(synth):
    # Anything webdataset's gopen opens is a shard: here a `pipe:` command.
    url = resolve_shards(os.path.join(synth("cls"), "shards", "train.index.json")).urls[3]
    assert len(list(iter_shard(f"pipe:cat {url}", skips=SkipCounter()))) == 3


def test_shuffle_buffer_is_seeded_and_accepts_iterators():
    # Pitfall 5: webdataset's _shuffle calls next() on its input; a generator works, the order is seed-determined.
    a = list(shuffled((i for i in range(50)), 10, seed=3))
    assert a == list(shuffled(iter(range(50)), 10, seed=3)) and sorted(a) == list(range(50)) and a != list(range(50))
    assert a != list(shuffled(iter(range(50)), 10, seed=4))


def test_pipe_spec_streams_without_running_its_command_to_find_an_index(synth):
    """A pipe: command runs only where the samples are read, never to look for an index (issue 14): no counts."""
    shards_dir = os.path.join(synth("cls"), "shards")
    shards = resolve_shards(f"pipe:cat {shards_dir}/train-{{000000..000003}}.tar")
    assert shards.urls[0] == f"pipe:cat {shards_dir}/train-000000.tar"
    assert shards.counts is None and shards.index is None
    loader = ShardLoader(shards, lambda s: s["__key__"], list, train=False, rank=1, world_size=2, seed=0,
                         batch_size=5, workers=0)
    # with no counts the ranks split by whole shards: rank 1 of 2 reads shards 1 and 3 (7 + 3 samples)
    assert [k for b in loader for k in b] == [f"{i:08d}" for i in [*range(7, 14), *range(21, 24)]]
