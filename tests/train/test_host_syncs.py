"""Host syncs per optimizer step in mona_dist's own code, counted on CPU.

A GPU run stalls whenever the host reads a device tensor's value. On a CPU nothing stalls, so two things are
counted instead, over real training runs of 4 and of 8 steps that log only at their first and last step:
- the deliberate reads, which go through `mona_dist.host_sync.to_host` and are counted there by site;
- every other value read (`.item()`, `.tolist()`, `float(t)`, `int(t)`, `bool(t)`, `.numpy()`, `.cpu()`,
  `torch.cuda.synchronize`) made from a line of mona_dist, found by wrapping those methods of torch.Tensor for the
  run and looking at the calling frame.
Set-up, the two log steps and the end cost the same in both runs; the four extra steps must add exactly one
counted read each (the loop's agreement) and no other read. The loader's own code is left out: it runs in loader
processes and reads host tensors there.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import torch

import mona_dist
from mona_dist.config import load_config
from mona_dist.host_sync import SYNCS
from mona_dist.train import train
from train_helpers import REPO, tiny_config

PKG = Path(mona_dist.__file__).resolve().parent
DOORS = {PKG / "host_sync.py"}
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")


def _ours(path: Path) -> bool:
    if path in DOORS or PKG not in path.parents:
        return False
    return not (path.parent == PKG / "data" and path.name != "preprocess.py")  # loader code: host side


@contextlib.contextmanager
def watched_reads() -> Iterator[Counter]:
    """Counts value reads made from mona_dist lines (file, line, how) while the block runs."""
    seen: Counter = Counter()

    def wrap(how, fn):
        def reader(*args, **kwargs):
            frame = sys._getframe(1)
            path = Path(frame.f_code.co_filename).resolve()
            if _ours(path):
                seen[(str(path.relative_to(PKG.parent)), frame.f_lineno, how)] += 1
            return fn(*args, **kwargs)
        return reader

    originals = {name: getattr(torch.Tensor, name) for name in READS}
    sync = torch.cuda.synchronize
    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        torch.cuda.synchronize = wrap("torch.cuda.synchronize", sync)
        yield seen
    finally:
        for name in READS:
            delattr(torch.Tensor, name)  # back to torch._C.TensorBase's own
        torch.cuda.synchronize = sync


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """task -> synthetic shards (16 train images of about 64 px), built on first use."""
    from mona_dist.data.synthetic import build

    root, built = tmp_path_factory.mktemp("sync-data"), {}

    def get(task: str) -> Path:
        if task not in built:
            build(task, str(root / task), num_train=16, num_val=4, size=64, per_shard=16)
            built[task] = root / task / "shards"
        return built[task]

    return get


def run_counted(config: Path, steps: int) -> tuple[Counter, Counter]:
    """(counted reads by site, other reads by (file, line, how)) of a run of `steps` steps."""
    cfg = load_config(config, [f"train.max_steps={steps}", f"train.log_interval={steps}", "train.ckpt_interval=0",
                               "train.eval_at_end=false", "train.eval_interval=0"])
    SYNCS.clear()
    with watched_reads() as others:
        assert train(cfg) == 0
    return Counter(SYNCS), others


def extra_reads(config: Path) -> tuple[Counter, Counter]:
    (syncs4, other4), (syncs8, other8) = run_counted(config, 4), run_counted(config, 8)
    return syncs8 - syncs4, other8 - other4


def test_the_counter_sees_reads_from_mona_dist_lines():
    """The watch itself: a read on a line of mona_dist is seen, the doors and other files are not."""
    from mona_dist.host_sync import host_values

    with watched_reads() as seen:
        torch.ones(2).tolist()  # this file: not ours
        host_values(torch.ones(2))  # the door
        mona_dist.adapters.io.count_parameters(torch.nn.Linear(2, 2))  # no value read there
        exec(compile("float(torch.ones(()))", str(PKG / "engine" / "probe.py"), "exec"), {"torch": torch})
    assert list(seen) == [("mona_dist/engine/probe.py", 1, "__float__")]


def test_a_cls_step_waits_for_the_device_once(tmp_path, cls_shards):
    config = tiny_config(tmp_path, cls_shards, data={"train_pipeline": {
        "random_resized_crop": {"size": 32, "scale": [0.6, 1.0]}, "flip": 0.5,
        "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05}}})
    syncs, others = extra_reads(config)
    assert syncs == Counter({"agree": 4}), syncs  # one per optimizer step, nothing else outside log steps
    assert not others, f"value reads in per-step code outside mona_dist/host_sync.py: {dict(others)}"


def test_a_seg_step_waits_for_the_device_once(tmp_path, shards):
    """UperNet through mmseg, with the device-side resize, flip and jitter of the seg pipeline."""
    config = tiny_config(tmp_path, shards("ade20k"), base=str(REPO / "configs" / "cpu" / "ade20k.yaml"), data={
        "train_pipeline": {"resize": {"short": 48, "max_size": 96, "ratio_range": [0.75, 1.25]},
                           "crop": {"size": [32, 32]}, "flip": 0.5,
                           "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05}},
        "eval_pipeline": {"resize": {"short": 32}}, "batch_size": 2})
    syncs, others = extra_reads(config)
    assert syncs == Counter({"agree": 4}), syncs
    assert not others, f"value reads in per-step code outside mona_dist/host_sync.py: {dict(others)}"


def test_a_detection_step_waits_for_the_device_once_in_our_code(tmp_path, shards):
    """Cascade Mask R-CNN (mmdet) with the device-side resize of images, boxes and masks. mmdet crops the target
    masks on the host, so each image's masks are copied once per step (2 images x 4 steps); mmdet's own code reads
    values too (its samplers and NMS); that is outside mona_dist and not counted here."""
    config = tiny_config(tmp_path, shards("coco"), base=str(REPO / "configs" / "cpu" / "coco.yaml"), data={
        "train_pipeline": {"resize": {"short": [40, 56], "max_size": 96}, "flip": 0.5},
        "eval_pipeline": {"resize": {"short": 48, "max_size": 96}}, "batch_size": 2})
    syncs, others = extra_reads(config)
    assert syncs == Counter({"agree": 4, "mmdet_gt_masks": 8}), syncs
    assert not others, f"value reads in per-step code outside mona_dist/host_sync.py: {dict(others)}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_torch_itself_sees_one_sync_per_step_from_mona_dist(tmp_path, cls_shards):
    """On a GPU, torch's own detector: with set_sync_debug_mode("warn") every synchronizing call warns at the
    Python line that made it. Four extra steps add four from host_sync.py (the agreement) and none from any
    other mona_dist line."""
    import warnings

    config = tiny_config(tmp_path, cls_shards)

    def syncs(steps: int) -> tuple[Counter, Counter]:
        cfg = load_config(config, [f"train.max_steps={steps}", f"train.log_interval={steps}", "train.ckpt_interval=0",
                                   "train.eval_at_end=false"])
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert train(cfg) == 0
        finally:
            torch.cuda.set_sync_debug_mode("default")
        where = [Path(w.filename).resolve() for w in caught if "synchroniz" in str(w.message).lower()]
        return Counter(str(p) for p in where if p in DOORS), Counter(str(p) for p in where if _ours(p))

    (doors4, ours4), (doors8, ours8) = syncs(4), syncs(8)
    assert sum((doors8 - doors4).values()) == 4, (doors4, doors8)
    assert not ours8 - ours4, ours8 - ours4
