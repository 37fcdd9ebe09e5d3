"""fairscale: OSS shards the AdamW state across ranks (stage 1); ShardedDDP also shards gradients (stage 2).

fairscale's FSDP (its stage 3) needs CUDA, so stage 3 is rejected at config time. The optimizer state is
consolidated on rank 0 to save and re-sharded by every rank on load, so a checkpoint is one `engine.pt` file.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from fairscale.nn.data_parallel import ShardedDataParallel
from fairscale.optim import OSS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine.ddp_engine import TorchEngine, needs_buffer_broadcast
from mona_dist.engine.optim import param_groups


class FairscaleEngine(TorchEngine):
    name = "fairscale"

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, device: torch.device):
        if not tdist.is_initialized():
            raise RuntimeError("the fairscale engine needs an initialised process group (even for one rank)")
        super().__init__(model, cfg, optim, device)
        self.optimizer = OSS(
            param_groups(self.model, optim), optim=torch.optim.AdamW,
            lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=self.foreach,
        )
        if cfg.zero_stage >= 2:
            self.module = ShardedDataParallel(self.model, self.optimizer)
        elif tdist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            broadcast = cfg.broadcast_buffers if cfg.broadcast_buffers is not None else needs_buffer_broadcast(model)
            self.module = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=broadcast,
                                                  gradient_as_bucket_view=cfg.gradient_as_bucket_view)

    def zero_grad(self) -> None:
        # ShardedDDP keeps small gradients as views into its reduce buckets; the optimizer's set_to_none would
        # detach them and the next step would reduce stale bucket contents. Its own zero_grad keeps the views.
        if isinstance(self.module, ShardedDataParallel):
            self.module.zero_grad(set_to_none=True)
        else:
            super().zero_grad()

    def clip(self, max_norm: float) -> torch.Tensor:
        # Under ShardedDDP only the owning rank holds a reduced gradient; OSS all-reduces the per-shard norms.
        return self.optimizer.clip_grad_norm(max_norm)

    def optimizer_state(self) -> dict | None:
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        return self.optimizer.state_dict() if tdist.get_rank() == 0 else None
