"""A Backbone as files: the complete backbone (trunk + method) for `build_backbone`, or a plain timm state dict.

    write_backbone(bb, "bb.safetensors")        # build_backbone(name, method, pretrained="bb.safetensors", ...)
    write_timm(bb, "timm.safetensors")          # timm.create_model(timm_name, pretrained=True, num_classes=0,
                                                #     pretrained_cfg_overlay=dict(file="timm.safetensors"), ...)

Merging: methods that only choose which trunk tensors train (full, fixed, bitfit, norm, partial1) are already a
timm model; LoRA folds into the fused qkv weight as PEFT's `merge_and_unload` does, W_q += scale * B_q @ A_q (and
v alike). Methods that add modules outside timm's layers (Mona, Adapter, AdaptFormer, LoRand, the E3VA / mona_hw
highway) cannot be merged. The timm file is in timm's own key layout (downsample at the start of a stage,
`layers.0` has none); the last output norm becomes timm's final `norm` (timm's `forward_features` applies it).
The output norms of earlier outputs have no place in a timm model. A cls run's linear head becomes timm's
classifier (`num_classes=K`): timm then computes the run's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapters.lora import LoRAQKVLinear
from ..models.backbone import Backbone, backbone_spec

FORMAT = "mona-dist-backbone/1"
MERGEABLE = ("full", "fixed", "bitfit", "norm", "partial1", "lora")
# Why each other method cannot become a plain timm model (one line each).
UNMERGEABLE = {
    "mona": "Mona modules sit on the residual stream after each residual add (nonlinear: depthwise convs, GELU)",
    "adapter": "bottleneck adapters with a GELU sit on the attention and MLP outputs",
    "adaptformer": "a GELU bottleneck runs beside each MLP",
    "lorand": "LoRand adapters with a GELU sit on the attention and MLP outputs",
    "e3va": "the E3VA highway is a second network beside the trunk",
    "mona_hw": "the mona_hw highway is a second network beside the trunk",
}


def _metadata(bb: Backbone, **extra: str) -> dict[str, str]:
    spec = backbone_spec(bb.name)
    return {"format": FORMAT, "backbone": bb.name, "method": str(bb.method),
            "out_indices": json.dumps(list(bb.out_indices)), "swin_arithmetic": bb.swin_arithmetic,
            "timm_name": spec.timm_name, "timm_kwargs": json.dumps(spec.timm_kwargs), **extra}


def _save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (and views of larger ones)
    save_file({k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone().contiguous()
               for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def backbone_state(bb: Backbone) -> dict[str, torch.Tensor]:
    """Every tensor of the backbone (trunk, method, output norms), under `bb.state_dict()` names."""
    return dict(bb.state_dict())


def write_backbone(bb: Backbone, path: str | Path, **metadata: str) -> Path:
    """The complete backbone in one safetensors file that `build_backbone(bb.name, bb.method, pretrained=path,
    out_indices=..., **method_options)` loads whole; the metadata names what to pass."""
    return _save(backbone_state(bb), path, _metadata(bb, **metadata))


def merged_trunk(bb: Backbone) -> dict[str, torch.Tensor]:
    """The trunk as a plain timm state dict: LoRA folded into qkv, the last output norm as timm's `norm`."""
    if bb.method not in MERGEABLE:
        why = UNMERGEABLE.get(bb.method, "it adds modules that a timm model does not have")
        raise ValueError(f"method {bb.method!r} cannot be merged into a plain timm model: {why}; export without "
                         f"--merge writes the complete backbone file instead")
    depth = bb.depth
    full = _full_depth(bb)
    if depth != full:
        raise ValueError(f"--merge needs the whole trunk: this backbone stops at output {bb.out_indices[-1]} of "
                         f"{full} (out_indices {list(bb.out_indices)}), so timm's later layers would be missing")
    sd = {k: v for k, v in bb.trunk.state_dict().items() if ".lora_" not in k}
    for name, m in bb.trunk.named_modules():
        if isinstance(m, LoRAQKVLinear):
            sd[f"{name}.weight"] = merged_qkv_weight(m)
    if bb.out_indices[-1] == depth - 1:
        last = bb.out_norms[-1]
        sd["norm.weight"], sd["norm.bias"] = last.weight.detach(), last.bias.detach()
    return sd


def merged_qkv_weight(m: LoRAQKVLinear) -> torch.Tensor:
    """PEFT's merge_and_unload on the q and v thirds: W + scale * B @ A, summed in fp64 and rounded once."""
    w = m.weight.detach().double()
    d = m.out_features // 3
    with torch.no_grad():
        w[:d] += m.scaling * (m.lora_B_q.double() @ m.lora_A_q.double())
        w[2 * d:] += m.scaling * (m.lora_B_v.double() @ m.lora_A_v.double())
    return w.to(m.weight.dtype)


def fold_lora_(model: torch.nn.Module) -> int:
    """In place: every LoRA qkv of `model` (a backbone, a task model, a detector) becomes a plain nn.Linear with
    the merged weight; returns how many were folded. What `mona-dist bench` times as `lora (merged)`."""
    folded = [m for m in model.modules() if isinstance(m, LoRAQKVLinear)]
    for m in folded:
        w = merged_qkv_weight(m)
        for name in ("lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v"):
            delattr(m, name)
        m.__class__ = torch.nn.Linear
        with torch.no_grad():
            m.weight.copy_(w)
    return len(folded)


def _timm_on_meta(bb: Backbone) -> torch.nn.Module:
    """The named backbone's timm model as timm builds it (shapes only)."""
    import timm

    spec = backbone_spec(bb.name)
    with torch.device("meta"):
        return timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)


def _full_depth(bb: Backbone) -> int:
    """Stages (Swin) or blocks (ViT) of the named backbone, whatever `out_indices` cut off."""
    return bb.layout.depth(_timm_on_meta(bb))


def timm_load_kwargs(bb: Backbone, with_head: bool) -> dict[str, object]:
    """The create_model arguments with which timm loads `write_timm`'s file: the name's family arguments, timm's
    always_partition for the official Swin arithmetic, and the classifier's pooling (`timm_head_kwargs`) when a
    head is written or when timm's default pooling has parameters a backbone does not keep (SigLIP's attention
    pool, an `fc_norm`: models/layout.py), which the file therefore lacks."""
    kwargs = dict(backbone_spec(bb.name).timm_kwargs)
    if bb.family == "swin" and bb.swin_arithmetic == "official":
        kwargs["always_partition"] = True
    t = _timm_on_meta(bb)
    fc_norm = getattr(t, "fc_norm", None)
    pooling = getattr(t, "attn_pool", None) is not None or (fc_norm is not None and len(list(fc_norm.parameters())) > 0)
    if with_head or pooling:
        kwargs.update(timm_head_kwargs(bb))
    return kwargs


def timm_head_kwargs(bb: Backbone) -> dict[str, object]:
    """What timm's classifier needs to compute a cls task's head: Swin pools the normed last stage (timm's default);
    ViT averages the normed patch tokens, which is timm's `global_pool='avg'` without its extra `fc_norm`."""
    return dict(bb.layout.timm_head_kwargs)


def write_timm(bb: Backbone, path: str | Path, head: torch.nn.Linear | None = None,
               **metadata: str) -> tuple[Path, list[str]]:
    """The merged trunk as a timm safetensors file (with `head`, a cls task's classifier, as timm's); returns it and
    notes for the user (output norms left out)."""
    sd = merged_trunk(bb)
    if head is not None:
        name = bb.layout.timm_head
        sd[f"{name}.weight"], sd[f"{name}.bias"] = head.weight.detach(), head.bias.detach()
    notes = []
    dropped = [i for i, n in zip(bb.out_indices[:-1], bb.out_norms[:-1])
               if not (torch.all(n.weight == 1) and torch.all(n.bias == 0))]
    if dropped:
        notes.append(f"the output norms of outputs {dropped} are trained or loaded (not LayerNorm(1, 0)); a timm "
                     f"model has no place for them: the complete backbone file (export without --merge) keeps them")
    return _save(sd, path, _metadata(bb, merged="true", **metadata)), notes
