"""The torch engines' checkpoints name tensors as state_dict() does, so they load whatever wraps the blocks."""

import pytest
import torch
from torch import nn

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine
from mona_dist.models import build_backbone


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = build_backbone("swin_nano_patch4_window7", "mona")
        self.head = nn.Linear(256, 3)

    def forward(self, batch):
        return {"loss": self.head(self.backbone(batch["images"])[-1].mean((2, 3))).pow(2).mean()}


def _engine(seed: int, checkpointing: bool):
    torch.manual_seed(seed)  # the frozen trunk comes from the seed
    return build_engine(Net(), EngineConfig(name="ddp", activation_checkpointing=checkpointing),
                        OptimConfig(lr=1e-2), micro_batch_size=2)


@pytest.mark.parametrize("save_ckpt,load_ckpt", [(True, True), (True, False), (False, True)])
def test_ddp_state_round_trips_with_and_without_activation_checkpointing(tmp_path, save_ckpt, load_ckpt):
    batch = {"images": torch.randn(2, 3, 64, 64)}
    src = _engine(0, save_ckpt)
    for _ in range(2):
        src.backward(src(batch)["loss"])
        src.step()
    src.save(tmp_path)
    keys = torch.load(tmp_path / "engine.pt", weights_only=True)["model"]
    assert not any("_checkpoint_wrapped_module" in k for k in keys)
    dst = _engine(0, load_ckpt)  # same frozen weights (they are rebuilt, not saved) ...
    with torch.no_grad():  # ... but scrambled trainable ones: only the load can make them equal again
        for p in dst.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    dst.load(tmp_path)
    src_params = {k.replace("_checkpoint_wrapped_module.", ""): p for k, p in src.model.named_parameters()}
    for name, p in dst.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, src_params[name.replace("_checkpoint_wrapped_module.", "")]), name
    src.train(False)
    dst.train(False)  # no dropout: the same weights give the same loss
    assert torch.equal(src(batch)["loss"], dst(batch)["loss"])
