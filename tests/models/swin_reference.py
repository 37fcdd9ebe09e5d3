"""An independent reference of the official Swin forward (Microsoft's detection/segmentation Swin, which the
official Mona code copies), in plain torch, written from the official arithmetic:

- patch embedding: zero-pad W, then H, up to a multiple of the patch; conv; LayerNorm;
- each block: norm1; pad bottom/right to a multiple of the window; on every odd block roll by -window//2 and add
  the shift mask of the *padded* map (-100 across regions); window attention with the relative position bias;
  roll back; crop; residual; (Mona 1); norm2, MLP, residual; (Mona 2);
- patch merging at the end of a stage: pad odd sides, concatenate x0 (even rows, even cols), x1 (odd rows, even
  cols), x2 (even rows, odd cols), x3 (odd rows, odd cols), LayerNorm, reduction;
- every stage's output through its own LayerNorm.

It reads the weights of a mona_dist Backbone (so both compute with the same tensors) but none of its code: the
window size, shift and heads come from the architecture, not from the modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 7
PATCH = 4


def layer_norm(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def patch_embed(images, pe):
    H, W = images.shape[-2:]
    x = F.pad(images, (0, (PATCH - W % PATCH) % PATCH))
    x = F.pad(x, (0, 0, 0, (PATCH - H % PATCH) % PATCH))
    x = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=PATCH).permute(0, 2, 3, 1)
    return layer_norm(x, pe.norm)


def merge_2x2(x):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C), the official concat order."""
    H, W = x.shape[1:3]
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


def patch_merging(x, pm):
    return F.linear(layer_norm(merge_2x2(x), pm.norm), pm.reduction.weight)


def relative_position_index(win: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (win - 1)  # 2, N, N, each in [0, 2 win - 2]
    return rel[0] * (2 * win - 1) + rel[1]


def shift_mask(Hp: int, Wp: int, win: int, shift: int) -> torch.Tensor:
    """(num_windows, N, N): 0 inside a region, -100 across the regions the roll brings together."""
    region = torch.zeros(Hp, Wp)
    cuts = ((0, Hp - win), (Hp - win, Hp - shift), (Hp - shift, Hp))
    cols = ((0, Wp - win), (Wp - win, Wp - shift), (Wp - shift, Wp))
    label = 0
    for h0, h1 in cuts:
        for w0, w1 in cols:
            region[h0:h1, w0:w1] = label
            label += 1
    ids = region.view(Hp // win, win, Wp // win, win).permute(0, 2, 1, 3).reshape(-1, win * win)
    return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


def window_attention(x, attn, heads: int, shift: int):
    """The official (S)W-MSA on a normalised (B, H, W, C) map."""
    B, H, W, C = x.shape
    win = WINDOW
    x = F.pad(x, (0, 0, 0, (win - W % win) % win, 0, (win - H % win) % win))
    Hp, Wp = x.shape[1:3]
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    nh, nw, N, d = Hp // win, Wp // win, win * win, C // heads
    windows = x.view(B, nh, win, nw, win, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, N, C)
    q, k, v = F.linear(windows, attn.qkv.weight, attn.qkv.bias).view(-1, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = (q * d**-0.5) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[relative_position_index(win).flatten()].view(N, N, heads)
    logits = logits + bias.permute(2, 0, 1)[None]
    if shift:
        logits = (logits.view(B, nh * nw, heads, N, N) + shift_mask(Hp, Wp, win, shift)[None, :, None]).view(-1, heads, N, N)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C)
    out = F.linear(out, attn.proj.weight, attn.proj.bias)
    out = out.view(B, nh, nw, win, win, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :H, :W]


def mona(m, x):
    """REFERENCE.md's Mona on a (B, H, W, C) map (eval: no dropout)."""
    xn = layer_norm(x, m.norm) * m.gamma + x * m.gammax
    p = F.linear(xn, m.project1.weight, m.project1.bias).permute(0, 3, 1, 2)
    convs = [m.adapter_conv.conv1, m.adapter_conv.conv2, m.adapter_conv.conv3]
    y = sum(F.conv2d(p, c.weight, c.bias, padding=c.weight.shape[-1] // 2, groups=p.shape[1]) for c in convs) / 3 + p
    z = y + F.conv2d(y, m.adapter_conv.projector.weight, m.adapter_conv.projector.bias)
    return x + F.linear(F.gelu(z.permute(0, 2, 3, 1)), m.project2.weight, m.project2.bias)


def block(blk, x, heads: int, shift: int, monas: bool):
    """One official block; returns (output, attention-branch output, MLP-branch output)."""
    a = window_attention(layer_norm(x, blk.norm1), blk.attn, heads, shift)
    x = x + a
    if monas:
        x = mona(blk.post_attn, x)
    m = F.linear(F.gelu(F.linear(layer_norm(x, blk.norm2), blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                 blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    x = x + m
    if monas:
        x = mona(blk.post_mlp, x)
    return x, a, m


@torch.no_grad()
def features(bb, images, heads: tuple[int, ...], method: str) -> dict[str, list[torch.Tensor]]:
    """Every stage's output, NCHW, as the official backbone computes it with `bb`'s weights, by method.

    "full": the plain backbone. "mona": Monas after each residual add. "e3va" gives "full" too (the frozen
    backbone's own features) and adds the highway (ours, adapters/highway.py): h += adapter_a(a) + adapter_m(m) per
    block, merged between stages by the backbone's reduction without its norm. Its adapters are called as modules:
    what is checked here is that they read the official taps.
    """
    t, plain, hw, h, k = bb.trunk, [], [], None, 0
    x = patch_embed(images, t.patch_embed)
    for s, stage in enumerate(t.layers):
        if s > 0:
            x = patch_merging(x, stage.downsample)
            if h is not None:
                h = F.linear(merge_2x2(h), stage.downsample.reduction.weight)
        for j, blk in enumerate(stage.blocks):
            x, a, m = block(blk, x, heads[s], WINDOW // 2 if j % 2 else 0, method == "mona")
            if method == "e3va":
                d = bb.highway.attn_adapters[k](a.contiguous()) + bb.highway.mlp_adapters[k](m)
                h, k = d if h is None else h + d, k + 1
        plain.append(layer_norm(x, bb.out_norms[s]).permute(0, 3, 1, 2))
        if h is not None:
            hw.append(layer_norm(x + h, bb.out_norms[s]).permute(0, 3, 1, 2))
    return {"e3va": hw, "full": plain} if method == "e3va" else {method: plain}
