"""The memory accounting equals a hand count on small models."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mona_dist.bench.accounting import (LiveTensorPeak, model_state_bytes, saved_activation_bytes,
                                       zero_model_state_estimate)

B, IN, HID = 4, 6, 10


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, 3))


def test_saved_activations_match_a_hand_count():
    model, x = _mlp(), torch.randn(B, IN)
    # Linear 1 keeps its input x (for its weight grad), ReLU keeps its output, Linear 2 keeps that same output
    # as its input (one storage, counted once); weights are parameters, not activations.
    expected = B * IN * 4 + B * HID * 4
    saved, out = saved_activation_bytes(lambda: model(x).sum(), exclude=model.parameters())
    assert saved == expected
    out.backward()


def test_frozen_first_layer_keeps_no_input():
    model, x = _mlp(), torch.randn(B, IN)
    model[0].requires_grad_(False)  # nothing needs x any more: the first layer's output is a constant
    saved, _ = saved_activation_bytes(lambda: model(x).sum(), exclude=model.parameters())
    assert saved == B * HID * 4


def test_checkpointed_modules_count_their_inputs_only():
    model, x = _mlp(), torch.randn(B, IN, requires_grad=True)
    block = model[1:]  # ReLU + Linear 2, checkpointed: only their input survives the forward

    def fwd():
        h = model[0](x)
        return checkpoint(block, h, use_reentrant=False).sum()

    saved, out = saved_activation_bytes(fwd, exclude=model.parameters(), checkpointed=[block])
    assert saved == B * IN * 4 + B * HID * 4  # x for Linear 1, and the checkpoint's input h (pre-ReLU)
    out.backward()
    assert model[2].weight.grad is not None


def test_model_state_bytes_match_a_hand_count_after_an_adamw_step():
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(B, IN)).sum().backward()
    opt.step()
    n_all = sum(p.numel() for p in model.parameters())
    n_train = HID * 3 + 3
    state = model_state_bytes(model, opt)
    assert state["params"] == 4 * n_all
    assert state["grads"] == 4 * n_train
    assert state["optimizer"] == 2 * 4 * n_train + 2 * 4  # exp_avg, exp_avg_sq, and one fp32 `step` per tensor
    assert state["total"] == state["params"] + state["grads"] + state["optimizer"]


def test_zero_estimate_follows_the_paper():
    psi = 1_000_000
    # bf16 mixed precision, no ZeRO: 2 (weights) + 2 (grads) + 12 (fp32 master + Adam) bytes per parameter.
    assert zero_model_state_estimate(psi, 0, "bf16", 0, 8)["total"] == 16 * psi
    assert zero_model_state_estimate(psi, 0, "bf16", 1, 8)["total"] == 4 * psi + 12 * psi // 8
    assert zero_model_state_estimate(psi, 0, "bf16", 2, 8)["total"] == 2 * psi + 14 * psi // 8
    assert zero_model_state_estimate(psi, 0, "bf16", 3, 8)["total"] == 16 * psi // 8
    # Frozen weights: storage only, sharded by ZeRO-3 alone.
    assert zero_model_state_estimate(0, psi, "fp32", 2, 4)["total"] == 4 * psi
    assert zero_model_state_estimate(0, psi, "fp32", 3, 4)["total"] == psi


def test_live_peak_counts_new_storages_until_their_last_reference_goes():
    with LiveTensorPeak() as live:
        a = torch.empty(1000)  # 4000 bytes
        v = a.view(10, 100)
        a.add_(1)  # a view and an in-place result are no new memory
        assert live.current == 4000
        b = a * 2
        assert live.current == 8000
        del a
        assert live.current == 8000  # the view still holds a's storage
        del v
        assert live.current == 4000
        c = torch.tensor([1.0, 2.0])  # built outside the dispatcher, handed to lift_fresh: still counted
        assert live.current == 4008
    assert live.peak == 8000 and b.numel() + c.numel() == 1002


def test_live_peak_of_a_training_step_matches_a_hand_count():
    model, x = _mlp(), torch.randn(B, IN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n_all = sum(p.numel() for p in model.parameters())
    with LiveTensorPeak(model.parameters()) as live:
        assert live.base == 4 * n_all
        loss = model(x).sum()
        # Forward: Linear 1's output h (B x HID) and ReLU's r live together (320 bytes, the forward's peak); h goes
        # when Sequential moves on, r stays (saved by ReLU and Linear 2), Linear 2's output goes after the sum.
        assert live.peak == live.base + 2 * B * HID * 4
        assert live.current == live.base + B * HID * 4 + 4
        loss.backward()
        assert live.current == live.base + 4 * n_all + 4  # r freed with the graph; one gradient per parameter
        opt.step()
    assert live.current == live.base + 2 * 4 * n_all + 4  # + SGD's momentum buffers
    assert live.current - 4 == model_state_bytes(model, opt)["total"]


def test_frozen_linear_inputs_are_what_a_keep_every_input_rule_would_add():
    from mona_dist.bench.runner import BenchSpec, make_batch
    from mona_dist.bench.saving_rule import frozen_linear_inputs

    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=[], task="seg", batch_size=1, img_size=32,
                     num_classes=5)
    batch = make_batch(spec, torch.device("cpu"))
    assert frozen_linear_inputs(spec, "full", batch)[1] == 0  # every weight trains: every input is saved already
    assert frozen_linear_inputs(spec, "fixed", batch)[1] == 0  # no gradient enters the backbone at all
    saved, extra = frozen_linear_inputs(spec, "bitfit", batch)
    full_saved = frozen_linear_inputs(spec, "full", batch)[0]
    # BitFit's biases train, its weights do not: the linear inputs full keeps are the ones BitFit does not
    assert 0 < extra and saved + extra <= full_saved


class FrozenMiddle(nn.Module):
    """A trainable input layer, a frozen 1024x1024 Linear (4 MiB of fp32 weight that autograd keeps for the input
    gradient), a trainable head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.frozen, self.head = nn.Linear(16, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 2)
        self.frozen.requires_grad_(False)

    def forward(self, batch: dict) -> dict:
        return {"loss": self.head(self.frozen(self.inp(batch["x"]))).pow(2).mean()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gathered_weights_are_not_activations_under_any_engine(one_gloo_rank):
    """Issue 25, item 4: the frozen weight ZeRO-3 gathers into its parameter and FSDP2 into an unsharded twin was
    counted as an activation (4.2 MB beside DDP's 8 KiB). DDP, ZeRO-0 and FSDP keep the same 8 KiB: the input
    layer's input (2x16 fp32), the head's input (2x1024 fp32) and the loss's square's input (2x2 fp32). ZeRO-3
    keeps the frozen layer's input too (2x1024 fp32): DeepSpeed replaces F.linear by its own autograd function,
    which saves the input of every Linear, frozen or not."""
    from mona_dist.config.schema import EngineConfig, OptimConfig
    from mona_dist.engine import build_engine

    batch = {"x": torch.randn(2, 16)}
    saved = {}
    for name, cfg in {"ddp": EngineConfig(name="ddp"), "fsdp": EngineConfig(name="fsdp"),
                      "zero0": EngineConfig(name="deepspeed", zero_stage=0),
                      "zero3": EngineConfig(name="deepspeed", zero_stage=3)}.items():
        model = FrozenMiddle()
        engine = build_engine(model, cfg, OptimConfig(), micro_batch_size=2, device=torch.device("cpu"))
        for step in range(2):  # the second forward is the one counted, as bench counts a step after warm-up
            count, loss = saved_activation_bytes(lambda: engine(batch)["loss"], exclude=list(model.parameters()))
            engine.backward(loss)
            engine.step()
        saved[name] = count
        engine.release()
    kept = (2 * 16 + 2 * 1024 + 2 * 2) * 4
    assert saved == {"ddp": kept, "fsdp": kept, "zero0": kept, "zero3": kept + 2 * 1024 * 4}, saved
