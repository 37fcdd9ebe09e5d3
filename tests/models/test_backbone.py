"""Backbone outputs, ViT prefix tokens and activation-checkpointing units."""

import pytest
import torch

from mona_dist.models import build_backbone, checkpoint_units


@pytest.mark.parametrize("swin_arithmetic", ["official", "timm"])
def test_swin_takes_any_input_size(swin_arithmetic):
    bb = build_backbone("swin_nano_patch4_window7", "mona", swin_arithmetic=swin_arithmetic)
    feats = bb(torch.randn(1, 3, 72, 100))  # windows pad; 25 and 13 are not multiples of 7
    assert [tuple(f.shape[-2:]) for f in feats] == [(18, 25), (9, 13), (5, 7), (3, 4)]
    feats = bb(torch.randn(1, 3, 201, 230))  # the patch embedding pads to 204 x 232
    assert [tuple(f.shape[-2:]) for f in feats] == [(51, 58), (26, 29), (13, 15), (7, 8)]


def test_a_bad_swin_arithmetic_is_one_clear_error():
    with pytest.raises(ValueError, match="swin_arithmetic must be one of official, timm, got 'mmdet'"):
        build_backbone("swin_nano_patch4_window7", "mona", swin_arithmetic="mmdet")


def test_out_indices_select_and_prune():
    bb = build_backbone("swin_nano_patch4_window7", "mona", out_indices=(1, 2))
    assert bb.out_channels == [64, 128] and bb.out_strides == [8, 16]
    assert len(bb.trunk.layers) == 3  # the last stage never runs, so it is not kept
    assert build_backbone("swin_nano_patch4_window7", "e3va", out_indices=(-1,)).out_channels == [256]
    with pytest.raises(ValueError, match="out_indices must be increasing"):
        build_backbone("swin_nano_patch4_window7", "mona", out_indices=(2, 1))


def test_vit_outputs_drop_prefix_tokens_and_check_the_patch_size():
    bb = build_backbone("vit_nano_patch16", "mona")
    assert bb.out_indices == (0, 1, 2, 3)
    feats = bb(torch.randn(2, 3, 48, 80))
    assert all(tuple(f.shape) == (2, 64, 3, 5) for f in feats)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        bb(torch.randn(1, 3, 50, 64))


def test_checkpoint_units_are_blocks_or_highway_adapters():
    assert len(checkpoint_units(build_backbone("swin_nano_patch4_window7", "mona"))) == 8
    assert len(checkpoint_units(build_backbone("vit_nano_patch16", "lora"))) == 4
    assert len(checkpoint_units(build_backbone("swin_nano_patch4_window7", "e3va"))) == 16
    assert checkpoint_units(build_backbone("swin_nano_patch4_window7", "e3va", lora_fa=True)) == []



def test_the_last_output_norm_is_the_releases_final_norm_eps_included():
    """Under timm arithmetic (ViT's only one) the last output norm takes over the trunk's final norm: its weights
    and its eps (timm's ViT: 1e-6; new output norms and timm's Swin: 1e-5), so it computes what the release did."""
    vit = build_backbone("vit_nano_patch16", "fixed")
    assert [n.eps for n in vit.out_norms] == [1e-5] * (len(vit.out_norms) - 1) + [1e-6]
    swin = build_backbone("swin_nano_patch4_window7", "fixed", swin_arithmetic="timm")
    assert [n.eps for n in swin.out_norms] == [1e-5] * len(swin.out_norms)
