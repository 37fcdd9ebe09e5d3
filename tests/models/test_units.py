"""The backbone is the one owner of its units (models/layout.py): each consumer gets exactly the modules it got when
it walked the trunk itself. The expectations are read here from the timm model's own structure (its named modules
and their classes), not from the layout."""

import pytest
import torch
from torch import nn
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock

from mona_dist.engine.activation import enable_activation_checkpointing
from mona_dist.export.merge import _full_depth
from mona_dist.models import LAYOUTS, block_units, build_backbone, checkpoint_units, compile_units, layout_of

CASES = [  # (backbone, method, options): block methods and both highways, Swin and ViT
    ("swin_nano_patch4_window7", "mona", {}),
    ("swin_nano_patch4_window7", "lora", {}),
    ("swin_nano_patch4_window7", "e3va", {}),
    ("swin_nano_patch4_window7", "e3va", {"lora_fa": True}),
    ("swin_nano_patch4_window7", "mona_hw", {}),
    ("vit_nano_patch16", "mona", {}),
    ("vit_nano_patch16", "full", {}),
    ("vit_nano_patch16", "e3va", {}),
    ("vit_nano_patch16", "e3va", {"lora_fa": True}),
]


def _names(model: nn.Module, units) -> list[str]:
    """`parent.attr` of each (parent, attr) unit as a name in `model`, after checking the parent holds it there."""
    where = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    out = []
    for parent, attr in units:
        assert isinstance(attr, str) and getattr(parent, attr) is parent._modules[attr]
        out.append(f"{where[id(parent)]}.{attr}".lstrip("."))
    return out


def _timm_blocks(model: nn.Module) -> list[str]:
    """Every timm transformer block, by name, in definition order (timm's forward order for Swin and ViT)."""
    return [n for n, m in model.named_modules() if isinstance(m, (SwinTransformerBlock, ViTBlock))]


def _highway_adapters(model: nn.Module, prefix: str = "") -> list[str]:
    hw = model.get_submodule(f"{prefix}highway")
    return [f"{prefix}highway.{group}.{i}" for group in ("attn_adapters", "mlp_adapters")
            for i in range(len(getattr(hw, group)))]


def _expected_blocks(name: str, model: nn.Module) -> list[str]:
    """Stage-major block names from the trunk's attribute layout, and the same list from the module classes."""
    trunk = model.trunk
    if name.startswith("swin"):
        by_layout = [f"trunk.layers.{s}.blocks.{j}" for s in range(len(trunk.layers))
                     for j in range(len(trunk.layers[s].blocks))]
    else:
        by_layout = [f"trunk.blocks.{j}" for j in range(len(trunk.blocks))]
    assert by_layout == _timm_blocks(model)
    return by_layout


@pytest.mark.parametrize("name,method,options", CASES, ids=lambda v: str(v) if v else "")
def test_each_consumer_gets_the_units_it_walked_before(name, method, options):
    bb = build_backbone(name, method, **options)
    blocks = _expected_blocks(name, bb)
    assert len(blocks) == (8 if name.startswith("swin") else 4)
    # FSDP shards every block, one unit each, in forward order, under every method
    assert _names(bb, block_units(bb)) == _names(bb, bb.block_units()) == blocks
    modules, taps = compile_units(bb)
    if bb.highway is None:
        assert _names(bb, checkpoint_units(bb)) == blocks
        assert _names(bb, modules) == blocks and taps == []
    else:
        adapters = _highway_adapters(bb)
        assert len(adapters) == 2 * len(blocks)
        # lora_fa adapters recompute themselves; the others are checkpointed one by one (e3va's LoRands)
        if method == "e3va":
            assert _names(bb, checkpoint_units(bb)) == ([] if options.get("lora_fa") else adapters)
        assert _names(bb, modules) == adapters
        assert [id(t) for t in taps] == [id(bb.get_submodule(b)) for b in blocks]


@pytest.mark.parametrize("name,depth,levels", [("swin_nano_patch4_window7", 4, "layers"),
                                                ("vit_nano_patch16", 4, "blocks")])
def test_depth_is_the_trunks_levels_before_and_after_a_cut(name, depth, levels):
    bb = build_backbone(name, "lora")
    assert bb.depth == len(getattr(bb.trunk, levels)) == depth == _full_depth(bb)
    cut = build_backbone(name, "lora", out_indices=(0, 1))
    assert cut.depth == len(getattr(cut.trunk, levels)) == 2 and _full_depth(cut) == depth
    assert _names(cut, cut.block_units()) == _timm_blocks(cut)  # the dropped levels' blocks are gone


def test_units_of_a_task_model_and_of_wrapped_blocks():
    """A model holding backbones: each backbone's units, in module order; wrappers are what the slots hold."""
    task = nn.ModuleDict({"backbone": build_backbone("swin_nano_patch4_window7", "mona"),
                          "aux": build_backbone("vit_nano_patch16", "e3va")})
    expected = [f"backbone.{b}" for b in _timm_blocks(task.backbone)] + [f"aux.{b}" for b in _timm_blocks(task.aux)]
    assert _names(task, block_units(task)) == expected
    assert _names(task, checkpoint_units(task)) == expected[:8] + _highway_adapters(task, "aux.")
    assert block_units(nn.Linear(2, 2)) == [] and compile_units(nn.Linear(2, 2)) == ([], [])
    before = [getattr(parent, attr) for parent, attr in block_units(task)]
    n = enable_activation_checkpointing(task)
    wrapped = [getattr(parent, attr) for parent, attr in block_units(task)]
    assert n == 8 + 8 and all(type(m).__name__ == "CheckpointWrapper" for m in wrapped[:8])
    assert [m._checkpoint_wrapped_module for m in wrapped[:8]] == before[:8]
    assert wrapped[8:] == before[8:]  # the highway's adapters were wrapped, not its blocks


def test_one_layout_entry_per_family():
    assert list(LAYOUTS) == ["swin", "vit"]
    bb = build_backbone("swin_nano_patch4_window7", "fixed")
    assert layout_of(bb.trunk) is bb.layout is LAYOUTS.get("swin")
    with pytest.raises(ValueError, match="unsupported model type Linear"):
        layout_of(nn.Linear(2, 2))


def _walk(trunk: nn.Module, x: torch.Tensor, out_indices) -> list[torch.Tensor]:
    """The trunk's forward as the Backbone walked it before the layout owned it."""
    outs = []
    x = trunk.patch_embed(x)
    if hasattr(trunk, "layers"):
        levels = trunk.layers
    else:
        x, levels = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(x))), trunk.blocks
    for i, level in enumerate(levels):
        x = level(x)
        if i in out_indices:
            outs.append(x)
    return outs


@pytest.mark.parametrize("name", ["swin_nano_patch4_window7", "vit_nano_patch16"])
def test_layout_features_are_the_trunks_own(name):
    torch.manual_seed(0)
    bb = build_backbone(name, "fixed", out_indices=(1, 2)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats, ref = bb.layout.features(bb.trunk, x, bb.out_indices), _walk(bb.trunk, x, bb.out_indices)
        assert len(feats) == 2 and all(torch.equal(f, r) for f, r in zip(feats, ref))
        for out, norm, r in zip(bb(x), bb.out_norms, ref):
            r = norm(r)
            if r.dim() == 4:  # Swin: (B, H, W, C)
                nchw = r.permute(0, 3, 1, 2)
            else:  # ViT: the patch tokens after the cls token, on the 4 x 6 grid
                nchw = r[:, 1:].transpose(1, 2).reshape(1, -1, 4, 6)
            assert torch.equal(out, nchw)
