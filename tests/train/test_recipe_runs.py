"""A recipe-style run through the real loop: images per step from train.global_batch (accumulation derived),
length in epochs from the shard index, epoch-counted evaluation, an epoch-stepped lr; the log states the plan."""

from __future__ import annotations

import json

from train_helpers import tiny_config
from mona_dist.config import load_config
from mona_dist.train import train


def test_global_batch_and_epochs_drive_the_run(tmp_path, cls_shards, capsys):
    # 64 training images, 16 per step on one rank with micro-batches of at most 4: 4 micro-batches, 4 steps/epoch.
    path = tiny_config(tmp_path, cls_shards,
                       train={"max_steps": None, "epochs": 2, "global_batch": 16, "interval_unit": "epoch",
                              "eval_interval": 1, "ckpt_interval": 1, "eval_at_end": False, "log_interval": 1},
                       schedule={"kind": "step", "by_epoch": True, "milestones": [1], "gamma": 0.5,
                                 "warmup_iters": 0},
                       optim={"lr": 1e-3})
    assert train(load_config(path)) == 0
    out = tmp_path / "run"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 2 epochs x 4 steps
    assert [r["lr"] for r in steps] == [1e-3] * 4 + [5e-4] * 4  # the lr changes at the epoch boundary
    assert [r["step"] for r in recs if any(k.startswith("eval/") for k in r)] == [4, 8]  # every epoch
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest") == \
        ["step-000004", "step-000008"]
    logged = capsys.readouterr()
    assert "global batch 16 = 1 rank(s) x 4 micro-batch(es) x 4 image(s); 8 steps (4 per epoch)" in logged.out + logged.err
