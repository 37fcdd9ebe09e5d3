"""Checkpoint files in the layouts the official code and Microsoft's Swin release use, made from a Backbone."""

from __future__ import annotations

import re

import torch


def official_mona_checkpoint(bb) -> dict:
    """What the official Mona (mmdet) code saves: `backbone.` prefix, `my_module_1/2`, merging at the end of a stage,
    output norms `norm0..3`, buffers, plus neck/head tensors that are not ours to load."""
    sd = {}
    for k, v in bb.state_dict().items():
        k = k.removeprefix("trunk.").replace(".post_attn.", ".my_module_1.").replace(".post_mlp.", ".my_module_2.")
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        k = re.sub(r"out_norms\.(\d+)\.", r"norm\1.", k)
        sd[f"backbone.{k}"] = v
    sd["backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    sd["neck.lateral_convs.0.conv.weight"] = torch.randn(8, 32, 1, 1)
    return {"meta": {"mmdet_version": "2.11.0"}, "state_dict": sd}


def microsoft_release(bb, final_norm: dict[str, torch.Tensor], classes: int = 1000) -> dict:
    """A Microsoft Swin classification release: `{"model": ...}`, merging at the end of a stage, the buffers
    (relative_position_index, attn_mask of shifted blocks), one final `norm` and a `head`; no output norms."""
    sd = {}
    for k, v in bb.trunk.state_dict().items():
        sd[re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)] = v
        if k.endswith("attn.relative_position_bias_table"):
            sd[k.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    sd.update({f"norm.{k}": v for k, v in final_norm.items()})
    sd["head.weight"], sd["head.bias"] = torch.randn(classes, bb.out_channels[-1]), torch.zeros(classes)
    return {"model": sd}
