"""Any timm ViT / Swin by name (models/names.py): names never in our registry build under a method, give the maps
the necks expect, count what the method's formula says, load timm's own weights whole and compute timm's features;
other families, unknown names and pretrained tags are one-line errors, at config load too.

Large models are built on the meta device (shapes only; a meta forward runs the same reshapes); arithmetic is
checked on small ones. Trainable counts, by hand from the layer sizes (REFERENCE.md):
  Mona: two per block, 133*C + 9728 each      LoRA (r=64, q and v of the fused qkv): 2 * (64*C + C*64) = 256*C
"""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mona_dist.config.loader import ConfigError, apply_overrides, read_yaml, validate
from mona_dist.models import BACKBONES, backbone_spec, build_backbone, count_parameters, load_pretrained
from mona_dist.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]

# name -> (family, channels of each output, stride of each output); none of them is in BACKBONES
NAMES = {
    "deit_tiny_patch16_224": ("vit", [192] * 4, [16] * 4),
    "deit3_small_patch16_224": ("vit", [384] * 4, [16] * 4),  # layer scale, no_embed_class
    "vit_small_patch14_reg4_dinov2": ("vit", [384] * 4, [14] * 4),  # 4 registers, 518 px position grid
    "vit_base_patch16_clip_224": ("vit", [768] * 4, [16] * 4),  # pre-norm
    "vit_base_patch16_siglip_224": ("vit", [768] * 4, [16] * 4),  # no cls token, attention pooling
    "flexivit_small": ("vit", [384] * 4, [16] * 4),
    "swin_s3_tiny_224": ("swin", [96, 192, 384, 768], [4, 8, 16, 32]),  # AutoFormerV2: windows 7/7/14/7
}
UNSUPPORTED = {
    "convnext_tiny": "ConvNeXt",
    "eva02_base_patch14_224": "Eva",
    "samvit_base_patch16": "VisionTransformerSAM",
    "swinv2_tiny_window8_256": "SwinTransformerV2",
}


def _widths(bb) -> list[int]:
    """C of every block, read from its layers (not from the backbone's answers)."""
    return [blk.norm1.normalized_shape[0] for parent, attr in bb.block_units() for blk in [getattr(parent, attr)]]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_a_timm_name_builds_with_the_maps_the_necks_expect_and_the_formula_counts(name):
    family, channels, strides = NAMES[name]
    assert name not in BACKBONES and backbone_spec(name).family == family
    h, w = 2 * strides[-1], 3 * strides[-1]  # non-square
    for method, per_block in (("mona", lambda c: 2 * (133 * c + 9728)), ("lora", lambda c: 256 * c)):
        with torch.device("meta"):
            bb = build_backbone(name, method)
            feats = bb(torch.empty(2, 3, h, w))
        assert (bb.out_channels, bb.out_strides) == (channels, strides)
        assert [tuple(f.shape) for f in feats] == [(2, c, h // s, w // s) for c, s in zip(channels, strides)]
        assert count_parameters(bb)[1] == sum(per_block(c) for c in _widths(bb)), method


def test_a_small_timm_vit_runs_on_cpu_and_trains_only_its_monas():
    torch.manual_seed(0)
    bb = build_backbone("deit_tiny_patch16_224", "mona", out_indices=(1, 3))
    feats = bb(torch.randn(2, 3, 32, 48))
    assert [tuple(f.shape) for f in feats] == [(2, 192, 2, 3)] * 2
    sum(f.pow(2).mean() for f in feats).backward()
    for n, p in bb.named_parameters():
        assert (p.grad is not None) == (".post_attn." in n or ".post_mlp." in n), n


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_timm_weights_load_whole_and_give_timms_features(name, tmp_path):
    """A plain timm model's state dict (random, as no weights can be downloaded here) loads with 100 % of the trunk's
    tensors under `fixed`, and the last output is timm's forward_features on the patch tokens (fp32, <= 1e-5)."""
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
    file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))
    bb = build_backbone(name, "fixed").eval()
    report = load_pretrained(bb, str(file))
    assert report.loaded == report.expected and not report.missing and not report.mismatched
    stride = bb.out_strides[-1]
    x = torch.randn(2, 3, 2 * stride, 3 * stride)
    with torch.no_grad():
        ours = bb(x)[-1]
        theirs = ref.forward_features(x)[:, ref.num_prefix_tokens:]
    theirs = theirs.transpose(1, 2).reshape(ours.shape)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_weights_by_timm_tag_for_a_name_never_registered(tmp_path, monkeypatch):
    """`model.pretrained: deit_tiny_patch16_224.fb_in1k` resolves through timm's pretrained_cfg to its hub repo,
    read here from an offline cache laid out as huggingface_hub's (tests/models/test_hub.py)."""
    from test_hub import _cache_repo

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    sd = {k: v.contiguous() for k, v in timm.create_model("deit_tiny_patch16_224").state_dict().items()}
    _cache_repo(tmp_path / "hub", "timm/deit_tiny_patch16_224.fb_in1k", {"model.safetensors": sd})
    bb = build_backbone("deit_tiny_patch16_224", "mona", pretrained="deit_tiny_patch16_224.fb_in1k")
    assert torch.equal(bb.trunk.pos_embed, sd["pos_embed"]) and torch.equal(bb.out_norms[-1].weight, sd["norm.weight"])


@pytest.mark.parametrize("name,cls", sorted(UNSUPPORTED.items()))
def test_an_unsupported_family_is_one_line_naming_it_and_what_is_supported(name, cls):
    with pytest.raises(ValueError) as err:
        build_backbone(name, "mona")
    msg = str(err.value)
    assert "\n" not in msg and f"is a timm {cls}," in msg
    assert "supported: any timm SwinTransformer (v1) or VisionTransformer" in msg


def test_unknown_names_tags_and_foreign_blocks_are_one_line_each():
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_smal_patch16_224'; valid: .*; close: "
                                         r"vit_small_patch16_224") as err:
        backbone_spec("vit_smal_patch16_224")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="carries a pretrained tag: name the architecture "
                                         "\\('vit_base_patch16_clip_224'\\) as the backbone"):
        backbone_spec("vit_base_patch16_clip_224.openai")
    with pytest.raises(ValueError, match="is a timm VisionTransformer with ParallelScalingBlock blocks"):
        backbone_spec("vit_base_patch16_xp_224")


def _config(tmp_path, *overrides):
    data = read_yaml(REPO / "configs/cpu/cls.yaml")
    return validate(apply_overrides(data, ["model.pretrained=null", f"output_dir={tmp_path}", *overrides]))


def test_a_config_names_any_timm_backbone_and_refuses_others_at_load(tmp_path):
    cfg = _config(tmp_path, "model.backbone=vit_base_patch16_clip_224")
    with torch.device("meta"):
        model = TASKS.get(cfg.task).build_model(cfg)
    assert model.backbone.name == "vit_base_patch16_clip_224" and model.backbone.out_channels[-1] == 768
    for bad, why in (("convnext_tiny", "is a timm ConvNeXt"), ("vit_smal_patch16_224", "unknown backbone")):
        with pytest.raises(ConfigError, match=f"^config: model.backbone: .*{why}"):
            _config(tmp_path, f"model.backbone={bad}")


def test_hybrid_vits_work_with_the_grid_of_their_cnn_stem():
    """A hybrid's patch embedding is a CNN stem (timm HybridEmbed): patch_size 1 (r50) or 8 (tiny r) on a feature
    map of stride 16 or 4, so its tokens' grid is the stem's output, not the input over patch_size."""
    with torch.device("meta"):
        bb = build_backbone("vit_base_r50_s16_224", "mona")
        feats = bb(torch.empty(1, 3, 64, 96))
    assert bb.out_strides == [16] * 4 and [tuple(f.shape) for f in feats] == [(1, 768, 4, 6)] * 4
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_r_s16_p8_224", "mona")  # stem stride 4, then 8x8 patches: stride 32
    assert bb.out_strides == [32] * 4
    assert [tuple(f.shape) for f in bb(torch.randn(1, 3, 64, 96))] == [(1, 192, 2, 3)] * 4
    with pytest.raises(ValueError, match="not divisible by the patch size 32"):
        bb(torch.randn(1, 3, 48, 96))
    # apply_method on timm's own hybrid (fixed image size, tokens flat): the grid comes from the stem too
    from mona_dist.adapters import apply_method

    plain = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, num_classes=0)
    apply_method(plain, "mona")
    assert plain(torch.randn(1, 3, 224, 224)).shape == (1, 192)


def test_a_merged_vit_whose_timm_pooling_has_weights_loads_back_into_timm(tmp_path):
    """timm's `test_vit3` pools with an attention pool ('map', as SigLIP): the backbone does not keep it, so the
    merged file lacks it and timm loads the file with the avg-pool arguments export prints; features equal."""
    from mona_dist.export.merge import timm_load_kwargs, write_timm

    torch.manual_seed(0)
    bb = build_backbone("test_vit3", "bitfit").eval()
    assert bb.trunk.attn_pool is None
    path, _ = write_timm(bb, tmp_path / "m.safetensors")
    kwargs = timm_load_kwargs(bb, with_head=False)
    assert kwargs == {"dynamic_img_size": True, "global_pool": "avg", "fc_norm": False}
    model = timm.create_model("test_vit3", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    s = bb.out_strides[-1]
    x = torch.randn(2, 3, 2 * s, 3 * s)
    with torch.no_grad():
        ours = bb(x)[-1]
        theirs = model.forward_features(x)[:, model.num_prefix_tokens:].transpose(1, 2).reshape(ours.shape)
    assert (ours - theirs).abs().max().item() <= 1e-5
