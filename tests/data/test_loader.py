"""Epoch splitting across ranks/workers, determinism, resume, corrupt data and start-up errors."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import pytest
import torch

from mona_dist.data import DataConfig, build_loader, resolve_shards
from mona_dist.data.config import PipelineConfig, RandomResizedCropConfig
from mona_dist.data.loader import ShardLoader

NUM_TRAIN, NUM_VAL = 24, 9  # tests/data/conftest.py


def key_loader(spec: str, *, rank=0, world_size=1, workers=2, train=True, seed=0, batch_size=2, **kw) -> ShardLoader:
    """A loader whose 'batches' are lists of sample keys: the splitting logic without decoding."""
    return ShardLoader(resolve_shards(spec), lambda s: s["__key__"], list, train=train, rank=rank,
                       world_size=world_size, seed=seed, batch_size=batch_size, workers=workers, **kw)


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_two_ranks_two_workers_see_every_sample_once(synth, split):
    spec = os.path.join(synth("cls"), "shards", f"{split}.index.json")
    n = NUM_TRAIN if split == "train" else NUM_VAL
    per_rank = [keys_of(key_loader(spec, rank=r, world_size=2, train=split == "train", shuffle_buffer=5))
                for r in range(2)]
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == n and sorted(seen) == [f"{i:08d}" for i in range(n)]
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


@pytest.mark.slow
def test_order_is_a_function_of_seed_and_epoch(synth):
    spec = os.path.join(synth("cls"), "shards", "train.index.json")

    def run(seed, epoch):
        loader = key_loader(spec, rank=1, world_size=2, seed=seed, shuffle_buffer=5)
        loader.set_epoch(epoch)
        return keys_of(loader)

    first = run(0, 0)
    assert run(0, 0) == first
    assert run(1, 0) != first
    assert run(0, 1) != first


@pytest.mark.slow
def test_balanced_training_gives_every_rank_the_same_steps(synth):
    spec = os.path.join(synth("cls"), "shards", "train.index.json")
    loaders = [key_loader(spec, rank=r, world_size=3, batch_size=3, drop_last=True, shuffle_buffer=4) for r in range(3)]
    counts = [len(list(loader)) for loader in loaders]
    assert counts == [len(loaders[0])] * 3 == [2, 2, 2]  # 24 // 3 = 8 per rank, 4 per worker -> one batch of 3 each
    assert all(loader.epoch == 1 for loader in loaders)  # the epoch advanced by itself
    # 5 ranks: 4 samples each (the tail of the epoch order is dropped), 2 per worker; no sample twice
    seen = [k for r in range(5) for k in keys_of(key_loader(spec, rank=r, world_size=5, drop_last=True,
                                                               shuffle_buffer=8))]
    assert len(seen) == 20 and len(set(seen)) == 20


def cls_config(synth, workers: int) -> DataConfig:
    out = synth("cls")
    return DataConfig(
        train_shards=os.path.join(out, "shards", "train-{000000..000003}.tar"),
        val_shards=os.path.join(out, "shards"),
        batch_size=3, workers=workers, shuffle_buffer=6, drop_last=True,
        train_pipeline=PipelineConfig(random_resized_crop=RandomResizedCropConfig(size=32), flip=0.5),
    )


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_mid_epoch_yields_the_remaining_batches(synth, workers):
    cfg = cls_config(synth, workers)
    full = build_loader("cls", cfg, "train", rank=1, world_size=2, seed=7)
    full.set_epoch(3)
    expected = list(full)
    assert len(expected) == len(full) == 4

    for stop in (1, 3):
        first = build_loader("cls", cfg, "train", rank=1, world_size=2, seed=7)
        first.set_epoch(3)
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == stop:
                break
        state = first.state_dict()
        assert state["epoch"] == 3 and state["position"] == stop

        resumed = build_loader("cls", cfg, "train", rank=1, world_size=2, seed=7)
        resumed.load_state_dict(state)
        resumed.set_epoch(3)  # the trainer's epoch loop calls this; it must not reset the position
        got = head + list(resumed)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["images"], b["images"])
        assert resumed.epoch == 4 and resumed.state_dict()["position"] == 0


@pytest.mark.slow
def test_resume_resampled_with_workers(synth):
    spec = os.path.join(synth("cls"), "shards", "train.index.json")
    opts = dict(workers=2, resampled=True, epoch_samples=40, batch_size=3, drop_last=True, shuffle_buffer=5)
    expected = list(key_loader(spec, **opts))
    assert len(expected) == 12  # 40 samples -> 20 per worker -> 6 batches of 3 each
    first = key_loader(spec, **opts)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    resumed = key_loader(spec, **opts)
    resumed.load_state_dict(first.state_dict())
    assert head + list(resumed) == expected


def test_resampled_epoch_has_fixed_length(synth):
    spec = os.path.join(synth("cls"), "shards", "train.index.json")
    loader = key_loader(spec, rank=0, world_size=2, workers=0, resampled=True, epoch_samples=30, batch_size=4,
                        drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 15 samples per rank -> 3 full batches of 4
    again = key_loader(spec, rank=0, world_size=2, workers=0, resampled=True, epoch_samples=30, batch_size=4,
                       drop_last=True)
    assert list(again) == batches  # seeded, not time-based


def corrupt_copy(synth, tmp_path, member: str) -> str:
    """Copy the cls train shards, replacing one member's bytes with garbage (the tar itself stays valid)."""
    src = os.path.join(synth("cls"), "shards")
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    path = dst / "train-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == member:
                data = b"\xff\xd8 not a jpeg at all" + bytes(50)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return str(dst)


def test_corrupt_member_is_skipped_and_counted(synth, tmp_path, caplog):
    shards = corrupt_copy(synth, tmp_path, "00000009.jpg")  # shard 1 holds samples 7..13
    cfg = cls_config(synth, 0).model_copy(update={"train_shards": shards + "/train.index.json", "drop_last": False})
    loader = build_loader("cls", cfg, "train", rank=0, world_size=1, seed=0)
    seen = sum(len(b["labels"]) for b in loader)
    assert seen == NUM_TRAIN - 1
    assert loader.skipped == 1 and loader.skip_counts == {"samples": 1, "shards": 0}
    assert "skipping corrupt sample" in caplog.text and "00000009" in caplog.text


def test_balanced_worker_refills_after_a_corrupt_sample(synth, tmp_path):
    shards = corrupt_copy(synth, tmp_path, "00000009.jpg")
    cfg = cls_config(synth, 0).model_copy(update={"train_shards": shards + "/train.index.json", "batch_size": 4})
    loader = build_loader("cls", cfg, "train", rank=0, world_size=1, seed=0)
    assert [len(b["labels"]) for b in loader] == [4] * 6  # still len(loader) full batches
    assert loader.skipped == 1


def test_truncated_shard_is_skipped_not_fatal(synth, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(os.path.join(synth("cls"), "shards"), dst)
    path = dst / "train-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    loader = key_loader(str(dst / "train.index.json"), workers=0, train=False)
    seen = keys_of(loader)
    assert 14 <= len(seen) < NUM_TRAIN
    assert loader.skip_counts["shards"] == 1


def test_missing_pattern_is_one_line_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(train_shards="data/synthetic/coco/shards/train-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError) as err:
        build_loader("coco", cfg, "train", rank=0, world_size=1, seed=0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "no shards match" in msg
    assert "mona-dist shards synthetic --task coco --out data/synthetic/coco" in msg
    with pytest.raises(FileNotFoundError, match="no such shard index"):
        resolve_shards(str(tmp_path / "x.index.json"))


def test_missing_member_of_a_brace_pattern(synth):
    spec = os.path.join(synth("cls"), "shards", "train-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match="missing shard .*train-000004.tar"):
        resolve_shards(spec)


def test_glob_and_counts_without_index(synth, tmp_path):
    for name in ("train-000000.tar", "train-000003.tar"):
        shutil.copy(os.path.join(synth("cls"), "shards", name), tmp_path / name)
    shards = resolve_shards(str(tmp_path / "train-*.tar"))
    assert shards.index is None and shards.counts == [7, 3]  # counted from the tar headers


def test_layout_change_starts_the_next_epoch(synth):
    spec = os.path.join(synth("cls"), "shards", "train.index.json")
    a = key_loader(spec, workers=0)
    next(iter(a))
    b = key_loader(spec, workers=0, world_size=2)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 1 and b.position == 0


def test_workers_0_seeds_only_the_cpu_generator(synth, monkeypatch):
    """In the trainer's process (workers=0) the per-sample augmentation seed must not reach the CUDA generators:
    `torch.manual_seed` calls `torch.cuda.manual_seed_all` (lazily queued on a CPU host), which would make the
    trainer's dropout masks on a GPU a function of the sample position (issue 25, item 10). On CPU this shows that
    the call is not made; tests/test_gpu_paths.py checks the CUDA generator's state itself."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    cfg = cls_config(synth, workers=0)
    torch.manual_seed(123)
    calls.clear()
    before = torch.get_rng_state()
    loader = build_loader("cls", cfg, "train", rank=0, world_size=1, seed=7)
    again = build_loader("cls", cfg, "train", rank=0, world_size=1, seed=7)
    first, second = next(iter(loader)), next(iter(again))
    assert calls == []
    assert torch.equal(torch.get_rng_state(), before)  # the trainer's CPU stream is untouched too
    assert torch.equal(first["images"], second["images"])  # augmentation is still a function of the position
