"""Parameter-efficient tuning methods for timm Swin / ViT: one registry, one function to apply them.

    from mona_dist.adapters import apply_method, Mona
    model = timm.create_model("swin_base_patch4_window7_224")
    apply_method(model, "mona")            # injects 2 Monas per block, freezes everything else

Every method freezes the model first, then adds its modules (which train) and/or unfreezes what it selects.
Swin computes the official Mona code's window arithmetic: a Backbone unless built with swin_arithmetic="timm", a
user's own timm Swin once `apply_method` has run (unless it is given swin_arithmetic="timm").
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Callable, Iterable

from pydantic import ConfigDict, Field, ValidationError, create_model, field_validator
from torch import nn

from ..registry import Registry
from .adapter import Adapter, apply_adapter
from .adaptformer import apply_adaptformer
from .blocks import SWIN_ARITHMETICS, family, set_swin_arithmetic
from .highway import Highway, apply_e3va, apply_mona_hw
from .io import count_parameters, load_adapter, save_adapter, trainable_state_dict
from .lora import apply_lora
from .lorand import LoRand, LowRankLinear, apply_lorand
from .mona import Mona, MonaOp, apply_mona
from .selective import apply_bitfit, apply_fixed, apply_full, apply_norm, apply_partial1

METHODS: Registry[Callable[..., None]] = Registry("method")

# Methods given the whole model (a Backbone's output norms count) vs. those that only touch transformer blocks.
_WHOLE_MODEL = {"full", "fixed", "bitfit", "norm", "partial1", "e3va", "mona_hw"}

for _name, _fn in {
    "full": apply_full,
    "fixed": apply_fixed,
    "bitfit": apply_bitfit,
    "norm": apply_norm,
    "partial1": apply_partial1,
    "adapter": apply_adapter,
    "lora": apply_lora,
    "adaptformer": apply_adaptformer,
    "lorand": apply_lorand,
    "mona": apply_mona,
    "e3va": apply_e3va,
    "mona_hw": apply_mona_hw,
}.items():
    METHODS.add(_name, _fn)


def method_options(method: str) -> dict[str, object]:
    """The options a method takes, with their defaults."""
    sig = inspect.signature(METHODS.get(method))
    return {n: p.default for n, p in list(sig.parameters.items())[1:]}


# Bounds of the options the methods share by name; their types come from each method's signature.
_BOUNDS: dict[str, dict[str, float]] = {
    "rank": {"gt": 0}, "hidden": {"gt": 0}, "inner_dim": {"gt": 0}, "branches": {"gt": 0}, "alpha": {"gt": 0},
    "hidden_ratio": {"gt": 0}, "dropout": {"ge": 0, "lt": 1}, "scale": {"allow_inf_nan": False},
}


def _kernels_are_odd(value: tuple[int, ...]) -> tuple[int, ...]:
    # depthwise filters pad k // 2 on each side: an even k would change the map's size
    if not value or any(k <= 0 or k % 2 == 0 for k in value):
        raise ValueError("needs one or more positive odd sizes")
    return value


def _options_model(method: str) -> type:
    fields: dict[str, Any] = {}
    for name, param in list(inspect.signature(METHODS.get(method), eval_str=True).parameters.items())[1:]:
        kind = param.annotation
        # numbers and switches as written (rank=true or rank=2.5 is a mistake); sequences may come as YAML lists
        strict = kind in (int, float, bool)
        fields[name] = (Annotated[kind, Field(strict=strict, **_BOUNDS.get(name, {}))], param.default)
    validators = {"kernels_odd": field_validator("kernels")(_kernels_are_odd)} if "kernels" in fields else {}
    return create_model(f"{method}_options", __config__=ConfigDict(extra="forbid"), __validators__=validators,
                        **fields)


class MethodOptionError(ValueError):
    """One bad method option: `option` names it, `reason` says what is wrong (configs prefix the key)."""

    def __init__(self, method: str, option: str, reason: str, message: str | None = None):
        super().__init__(message or f"method {method!r}: option {option}: {reason}")
        self.option, self.reason = option, reason


def check_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` checked against `method`'s signature (names, types, bounds); returns them with sequences as
    tuples. The first problem is one MethodOptionError line: `method 'mona': option inner_dim: ...`."""
    valid = method_options(method)
    bad = sorted(set(options) - set(valid))
    if bad:
        names = ", ".join(valid) or "none"
        raise MethodOptionError(method, bad[0], f"unknown option; valid: {names}",
                                f"method {method!r} has no option {bad[0]!r}; valid: {names}")
    try:
        checked = _options_model(method).model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        raise MethodOptionError(method, str(first["loc"][0]), f"{msg} (got {first['input']!r})") from None
    return {k: getattr(checked, k) for k in options}


def parse_method_options(pairs: Iterable[str]) -> dict[str, object]:
    """["lora_fa=true", "rank=4"] -> {"lora_fa": True, "rank": 4}: values parsed as YAML (safe_load), as in configs."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method options are key=value, got {pair!r}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem", None) or type(err).__name__
            raise ValueError(f"method option {key}: {value!r} is not valid YAML ({mark})") from None
    return options


def apply_method(model: nn.Module, method: str, swin_arithmetic: str | None = None, **options) -> nn.Module:
    """Apply `method` in place to a timm Swin/ViT or a mona_dist Backbone; return the model.

    A plain timm Swin is switched to the official Mona code's window arithmetic (`swin_arithmetic="official"`, the
    default; "timm" keeps timm's, see adapters/blocks.py); a Backbone keeps the arithmetic it was built with unless
    `swin_arithmetic` is given. Unknown methods and options are errors that list the valid ones.
    """
    fn = METHODS.get(method)
    options = check_method_options(method, options)
    trunk = getattr(model, "trunk", model)
    family(trunk)  # fail early, naming what is supported
    if getattr(model, "method", None) is not None:
        raise ValueError(f"a method ({model.method!r}) is already applied to this model")
    if family(trunk) == "swin" and (swin_arithmetic is not None or not hasattr(model, "trunk")):
        set_swin_arithmetic(model, swin_arithmetic or "official")
    model.requires_grad_(False)
    fn(model if method in _WHOLE_MODEL else trunk, **options)
    model.method = method
    # Every option, defaults filled in: what an adapter file records and is checked against (adapters/io.py).
    model.method_options = {**method_options(method), **options}
    return model


__all__ = [
    "METHODS",
    "SWIN_ARITHMETICS",
    "Adapter",
    "Highway",
    "LoRand",
    "LowRankLinear",
    "Mona",
    "MonaOp",
    "MethodOptionError",
    "apply_method",
    "check_method_options",
    "count_parameters",
    "load_adapter",
    "method_options",
    "parse_method_options",
    "save_adapter",
    "set_swin_arithmetic",
    "trainable_state_dict",
]
