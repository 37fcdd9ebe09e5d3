"""mmseg's PhotoMetricDistortion (the official ADE20K recipe): random draws in the worker, pixels on the device.

mmseg (0.x, as the official runs, and 1.x alike) applies to a uint8 image, each step with probability 0.5:
brightness `+ U(-32, 32)`, contrast `x U(0.5, 1.5)` (a plain multiply, not torchvision's blend with the mean),
saturation `S x U(0.5, 1.5)` and hue `H + randint(-18, 18)` (mod 180) in OpenCV's 8-bit HSV, with contrast either
second or last (p = 0.5). Every step clips to [0, 255] and truncates back to uint8. `PhotoMetricDraw` makes those
draws with the worker's seeded generator (so augmentation stays a function of seed, epoch and rank) and
`apply_photometric` replays them on a float tensor holding uint8 values, with OpenCV's own integer HSV arithmetic
(`rgb_to_hsv_u8`, `hsv_to_rgb_u8`), so the device reproduces mmseg's pixels (tested against mmseg and cv2).
"""

from __future__ import annotations

import torch

# One draw row: brightness (on, delta), contrast (on, alpha, last), saturation (on, alpha), hue (on, delta).
COLUMNS = ("b_on", "beta", "c_on", "c_alpha", "c_last", "s_on", "s_alpha", "h_on", "h_delta")
_SHIFT = 12  # OpenCV's hsv_shift: fixed-point tables in RGB2HSV_b


class PhotoMetricDraw:
    """The draws of mmseg's `PhotoMetricDistortion(brightness_delta, contrast_range, saturation_range, hue_delta)`,
    in its order; returns one float32 row of `COLUMNS`."""

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.delta, self.contrast, self.saturation, self.hue = brightness_delta, contrast_range, saturation_range, \
            hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()).item())

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def __call__(self) -> torch.Tensor:
        row = dict.fromkeys(COLUMNS, 0.0)
        row["c_alpha"] = row["s_alpha"] = 1.0
        if self._coin():
            row.update(b_on=1.0, beta=self._uniform(-self.delta, self.delta))
        contrast_last = not self._coin()  # mmseg: mode = randint(2); mode == 1 puts contrast first
        row["c_last"] = float(contrast_last)

        def contrast() -> None:
            if self._coin():
                row.update(c_on=1.0, c_alpha=self._uniform(*self.contrast))

        if not contrast_last:
            contrast()
        if self._coin():
            row.update(s_on=1.0, s_alpha=self._uniform(*self.saturation))
        if self._coin():
            row.update(h_on=1.0, h_delta=float(torch.randint(-self.hue, self.hue, ()).item()))  # numpy's high is open
        if contrast_last:
            contrast()
        return torch.tensor([row[c] for c in COLUMNS], dtype=torch.float32)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's `convert`: float32 `x * alpha + beta`, clipped to [0, 255], truncated to integers (astype uint8)."""
    return (x * alpha + beta).clamp_(0, 255).floor_()


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(256, dtype=torch.float64, device=device)
    sdiv = torch.where(i > 0, torch.round((255 << _SHIFT) / i.clamp(min=1)), 0.0).to(torch.int32)
    hdiv = torch.where(i > 0, torch.round((180 << _SHIFT) / (6 * i.clamp(min=1))), 0.0).to(torch.int32)
    return sdiv, hdiv


def rgb_to_hsv_u8(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV `COLOR_RGB2HSV` on 8-bit data (H in [0, 180)): (3, h, w) integer-valued -> int32 (3, h, w)."""
    r, g, b = rgb.to(torch.int32).unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    sdiv, hdiv = _tables(rgb.device)
    half = 1 << (_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> _SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _SHIFT  # arithmetic shift: floor, as C++ on int
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v])


_SIMD_BLOCK = 32  # pixels per vectorised step of HSV2RGB_b with AVX2 (4 x 8 float lanes)


def hsv_to_rgb_u8(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV 4.x `COLOR_HSV2RGB` on 8-bit data, row by row as OpenCV runs it -> float (3, h, w) 0..255.

    Each row's first `w - w % 32` pixels take OpenCV's vectorised path (AVX2), which truncates `x * 255`; the rest
    take its scalar path, which rounds. Both use fused multiply-adds for `1 - s * f` (emulated in float64).
    """
    h, s, v = hsv.to(torch.float32).unbind(0)
    s, v = s * (1.0 / 255.0), v * (1.0 / 255.0)
    h = h * (6.0 / 180.0)
    pre = h.trunc()
    f = h - pre
    sector = pre - (pre * (1.0 / 6.0)).trunc() * 6.0
    s64 = s.double()
    fused = (1 - s64 * f.double()).float(), (1 - s64 * (1 - f).double()).float()
    tab = torch.stack([v, v * (1 - s), v * fused[0], v * fused[1]])
    # OpenCV's sector_data gives (b, g, r) indices into tab per sector; here (r, g, b).
    order = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=hsv.device)
    idx = order[sector.long().clamp(0, 5)].permute(2, 0, 1)  # (3, h, w)
    rgb = torch.gather(tab, 0, idx) * 255.0
    out = rgb.trunc()
    tail = out.shape[-1] - out.shape[-1] % _SIMD_BLOCK
    if tail < out.shape[-1]:  # the scalar path: s == 0 gives grey, and the product is rounded
        grey = (s == 0)[None, :, tail:]
        out[..., tail:] = torch.where(grey, (v * 255.0)[None, :, tail:], rgb[..., tail:]).round()
    return out.clamp_(0, 255)


def apply_photometric(x: torch.Tensor, row: torch.Tensor | list[float]) -> torch.Tensor:
    """One image, float (3, h, w) holding uint8 values (RGB), distorted as mmseg with one `PhotoMetricDraw` row."""
    d = dict(zip(COLUMNS, row.tolist() if isinstance(row, torch.Tensor) else row))
    if d["b_on"]:
        x = _convert(x, beta=d["beta"])
    if d["c_on"] and not d["c_last"]:
        x = _convert(x, alpha=d["c_alpha"])
    if d["s_on"]:
        hsv = rgb_to_hsv_u8(x)
        hsv[1] = _convert(hsv[1].float(), alpha=d["s_alpha"]).to(torch.int32)
        x = hsv_to_rgb_u8(hsv)
    if d["h_on"]:
        hsv = rgb_to_hsv_u8(x)
        hsv[0] = torch.remainder(hsv[0] + int(d["h_delta"]), 180)
        x = hsv_to_rgb_u8(hsv)
    if d["c_on"] and d["c_last"]:
        x = _convert(x, alpha=d["c_alpha"])
    return x
