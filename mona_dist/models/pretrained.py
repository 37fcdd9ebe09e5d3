"""Loading pretrained weights into a Backbone, whatever format they come in.

`path` is a local file, or a name that hub.py resolves to one (a timm pretrained tag, `timm/<name>`,
`hf-hub:<repo>`): the file then loads exactly like a local one, with the same report.

Accepted (detected from the keys, never from the file name):
- timm format: `layers.N.blocks.M...` (downsample at the start of a stage), `norm.*`, `head.fc.*`;
- Microsoft Swin release: `{"model": {...}}`, downsample at the *end* of a stage, `head.*`;
- an official Mona checkpoint (mmdet/mmseg): `{"state_dict": {"backbone.layers...", "neck...", ...}}`, Mona
  modules as `blocks.M.my_module_1/2`, output norms as `backbone.norm0..3`;
- a release's final `norm` goes into the last output norm only under `swin_arithmetic="timm"` (and for ViT); the
  official Swin runs never load it (it is an unexpected key in their logs), so there it is reported unexpected;
- our own files (`mona-dist convert` output, or any Backbone `state_dict()`): `trunk.*`, `out_norms.*`,
  method tensors;
- `.safetensors` or torch files; torch files load with `weights_only=True`, so a checkpoint cannot run code.

The official Mona code silently loads nothing when the names do not match. Here missing and unexpected keys are
reported, fewer than 90 % of the trunk's tensors loaded is an error, and so are the weights of another architecture
(tensors of blocks or stages this trunk does not have, e.g. Swin-S into Swin-T, or trunk tensors of other shapes)
unless `strict=False` (`model.pretrained_strict: false`): then the matching part loads.

Reports: `load_pretrained` warns through `logging` about missing/unexpected keys. Inside `loading_policy(...)` (the
trainer wraps the task's model build in it) reports are collected instead, and the trainer prints them on rank 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resize_rel_pos_bias_table

from ..serialization import safe_torch_load

log = logging.getLogger(__name__)

MIN_LOADED_FRACTION = 0.9
# The official Mona block attributes -> our slots (mona_dist.adapters.blocks).
OFFICIAL_MONA_NAMES = {"my_module_1": "post_attn", "my_module_2": "post_mlp"}


@dataclass
class LoadReport:
    loaded: int
    expected: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    method_loaded: int = 0
    architecture: list[str] = field(default_factory=list)  # tensors of blocks/stages the trunk lacks, or reshaped

    @property
    def fraction(self) -> float:
        return self.loaded / max(self.expected, 1)

    def summary(self) -> str:
        return (
            f"loaded {self.loaded}/{self.expected} trunk tensors ({self.fraction:.0%}), {self.method_loaded} method "
            f"tensors; {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched"
        )

    def details(self) -> str:
        """The summary plus the first names of each list, for the run's log."""
        parts = [self.summary()]
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape-mismatched", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{what}: {', '.join(keys[:4])}{more}")
        return "; ".join(parts)


_POLICY: contextvars.ContextVar[tuple[bool, list] | None] = contextvars.ContextVar("pretrained_policy", default=None)


@contextlib.contextmanager
def loading_policy(strict: bool = True):
    """Within it, `load_pretrained` calls default to `strict` and append (path, LoadReport) to the yielded list
    instead of logging; the trainer sets it around the task's model build (`model.pretrained_strict`)."""
    reports: list[tuple[str, LoadReport]] = []
    token = _POLICY.set((strict, reports))
    try:
        yield reports
    finally:
        _POLICY.reset(token)


_INDEX = re.compile(r"\.\d+\.")


def architecture_keys(unexpected: list[str], mismatched: list[str], trunk_keys: list[str]) -> list[str]:
    """File tensors that say "another architecture": trunk tensors of a block or stage index this trunk lacks
    (their name, indices aside, is one of the trunk's), and trunk tensors of another shape."""
    templates = {_INDEX.sub(".#.", f"trunk.{k}") for k in trunk_keys}
    extra = [k for k in unexpected if k.startswith("trunk.") and _INDEX.sub(".#.", k) in templates]
    return extra + [k for k in mismatched if k.startswith("trunk.")]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a local checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained file not found: {path}")
    try:
        sd = load_file(str(path)) if path.suffix == ".safetensors" else safe_torch_load(path)
    except (ValueError, SafetensorError, OSError) as err:  # truncated, foreign or code-carrying files
        why = str(err).removeprefix(f"checkpoint {path} ")
        raise ValueError(f"model.pretrained: {path} is not a readable checkpoint ({why})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no tensor state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a detector/segmentor: keep only its backbone
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def to_backbone_names(sd: dict[str, torch.Tensor], bb) -> dict[str, torch.Tensor]:
    """Rename any accepted format into `bb.state_dict()` names."""
    if any(k.startswith(("trunk.", "out_norms.")) for k in sd):
        return dict(sd)  # already ours
    trunk = bb.trunk
    old_swin = bb.family == "swin" and "layers.0.downsample.reduction.weight" in sd
    last = bb.depth - 1
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if "relative_position_index" in k or "attn_mask" in k or k.startswith(("head", "attn_pool.", "fc_norm.")):
            continue  # non-persistent buffers and classifiers (a ViT's pooling is its classifier's: layout.py)
        for official, ours in OFFICIAL_MONA_NAMES.items():
            k = k.replace(f".{official}.", f".{ours}.")
        m = re.fullmatch(r"norm(\d+)\.(weight|bias)", k)
        if m and bb.family == "swin":  # mmdet-style output norms
            idx = int(m.group(1))
            if idx in bb.out_indices:
                out[f"out_norms.{bb.out_indices.index(idx)}.{m.group(2)}"] = v
            continue
        if k in ("norm.weight", "norm.bias"):  # the trunk's final norm (classification)
            if bb.swin_arithmetic == "official":  # the official runs leave it out: reported as unexpected
                out[k] = v
            elif bb.out_indices[-1] == last:  # timm: it feeds the last output
                out[f"out_norms.{len(bb.out_indices) - 1}.{k.split('.')[1]}"] = v
            continue
        if old_swin:  # Microsoft's release merges at the end of stage N, timm at the start of stage N+1
            k = re.sub(r"layers\.(\d+)\.downsample", lambda g: f"layers.{int(g.group(1)) + 1}.downsample", k)
        out[f"trunk.{k}"] = v
    return _resize_to(out, bb)


def _resize_to(sd: dict[str, torch.Tensor], bb) -> dict[str, torch.Tensor]:
    """Resample relative-position tables (other window sizes) and ViT position embeddings (other image sizes)."""
    own = bb.state_dict()
    for k, v in list(sd.items()):
        if k not in own or own[k].shape == v.shape:
            continue
        if k.endswith("relative_position_bias_table"):
            attn = bb.get_submodule(k.rsplit(".", 1)[0])
            sd[k] = resize_rel_pos_bias_table(v, new_window_size=attn.window_size, new_bias_shape=own[k].shape)
        elif k == "trunk.pos_embed":
            from timm.layers import resample_abs_pos_embed

            prefix = 0 if bb.trunk.no_embed_class else bb.trunk.num_prefix_tokens
            sd[k] = resample_abs_pos_embed(v, bb.trunk.patch_embed.grid_size, num_prefix_tokens=prefix)
    return sd


def load_pretrained(bb, path: str | Path, strict: bool | None = None) -> LoadReport:
    """Load `path` into backbone `bb` (method already applied); raise if under 90 % of the trunk loaded, or (with
    `strict`, the default) if the file holds another architecture (module docstring)."""
    from .hub import resolve_pretrained

    policy = _POLICY.get()
    strict = strict if strict is not None else (policy[0] if policy is not None else True)
    file = resolve_pretrained(path)
    if str(file) != str(path):  # a name: the report says which file it meant
        path = f"{path} ({file})"
    sd = to_backbone_names(read_checkpoint(file), bb)
    own = bb.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    trunk_expected = {f"trunk.{k}" for k in bb.trunk_keys}
    report = LoadReport(
        loaded=len(trunk_expected & set(usable)),
        expected=len(trunk_expected),
        missing=sorted(trunk_expected - set(usable)),
        unexpected=sorted(k for k in sd if k not in own),
        mismatched=sorted(k for k in sd if k in own and own[k].shape != sd[k].shape),
        method_loaded=len({k for k in usable if not k.startswith(("trunk.", "out_norms."))}
                          | {k for k in usable if k.startswith("trunk.") and k not in trunk_expected}),
    )
    report.architecture = architecture_keys(report.unexpected, report.mismatched, bb.trunk_keys)
    if report.fraction < MIN_LOADED_FRACTION:
        example = (report.unexpected or report.mismatched or ["<none>"])[0]
        raise ValueError(
            f"{path}: only {report.loaded}/{report.expected} backbone tensors match {bb.name} "
            f"({report.fraction:.0%} < 90%); first unmatched key in the file: {example}"
        )
    if strict and report.architecture:
        raise ValueError(
            f"model.pretrained: {path} holds another architecture than {bb.name}: {len(report.architecture)} trunk "
            f"tensors of blocks or stages it lacks or of other shapes (e.g. {report.architecture[0]}); set "
            f"model.pretrained_strict: false to load the part that matches"
        )
    bb.load_state_dict(usable, strict=False)
    if bb.highway is not None and bb.highway.merges is not None and not any(k.startswith("highway.merges.") for k in usable):
        bb.highway.copy_merges_from(bb.trunk)  # the highway's merges start as copies of the loaded ones
    if policy is not None:
        policy[1].append((str(path), report))
    elif report.missing or report.unexpected or report.mismatched:
        log.warning("%s: %s", path, report.details())
    else:
        log.info("%s: %s", path, report.summary())
    return report
