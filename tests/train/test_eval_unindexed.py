"""Evaluation over val shards without an index under ZeRO-3 and FSDP on 2 ranks ends (issue 25, item 6).

Without sample counts no padding batches can be planned, so ranks would run unequal numbers of eval forwards; under
ZeRO-3 and FSDP every forward is collective and the rank with more batches waited forever. The run is refused at
start-up, in one line, on every rank, before the model is built.
"""

from __future__ import annotations

import pytest

from test_distributed_runs import finish
from test_fsdp_runs import torchrun
from train_helpers import tiny_config


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", [{"name": "fsdp"}, {"name": "deepspeed", "zero_stage": 3}], ids=["fsdp", "zero3"])
def test_unindexed_val_shards_end_the_run_instead_of_hanging(tmp_path, cls_shards, engine):
    # A `pipe:` spec never has an index (local tars are counted by reading them): one val shard, so rank 1 gets
    # no sample at all and rank 0 two batches.
    config = tiny_config(tmp_path, cls_shards, engine=engine, train={"max_steps": 2, "ckpt_interval": 2},
                         data={"val_shards": f"pipe:cat {cls_shards}/val-000000.tar", "allow_pipe": True})
    rc, out = finish(torchrun(config), timeout=300)
    assert rc != 0, out[-3000:]
    refusals = [line for line in out.splitlines() if "no index with sample counts, so ranks would run" in line]
    assert len(refusals) >= 2, out[-3000:]  # each rank says it, in one line
