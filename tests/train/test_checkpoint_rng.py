"""Checkpoint RNG: this rank's own GPU generator only, so a resume that sees fewer GPUs per task still loads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mona_dist.train import rng


def test_only_the_current_gpus_generator_is_saved_and_restored(monkeypatch):
    # A node of 8 visible GPUs at save time: the state must not depend on how many GPUs this task sees.
    saved_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved_state.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every GPU's state"))
    state = rng.rng_state()
    assert "cuda" not in state and torch.equal(state["cuda_device"], saved_state)
    rng.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], saved_state)


def test_a_cpu_resume_of_a_gpu_checkpoint_ignores_the_gpu_state(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU resume, on any machine
    # torch queues a CUDA state set without CUDA for later (no error): it must not be called at all
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: pytest.fail("restored a GPU state on the CPU"))
    state = rng.rng_state() | {"cuda_device": torch.zeros(16, dtype=torch.uint8)}
    before = torch.get_rng_state()
    # the run draws on after its save: the restore must bring back every CPU generator, not merely leave them be
    want = (torch.rand(4), random.random(), np.random.rand(4))
    rng.set_rng_state(state)  # nothing to restore the GPU state into, and no error
    assert torch.equal(torch.get_rng_state(), before)
    got = (torch.rand(4), random.random(), np.random.rand(4))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])


@pytest.mark.gpu
def test_gpu_generator_round_trip():
    state = rng.rng_state()
    a = torch.rand(4, device="cuda")
    rng.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), a)
