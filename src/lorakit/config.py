"""`LoraConfig`: what to adapt and how, validated on creation, convertible to and from PEFT's adapter_config.json."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, ConfigWarning

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "lora_only", "all")
INIT_MODES = ("kaiming", "gaussian", "pissa", "olora", "loftq")  # plus "pissa_niter_N" (PiSSA by randomised SVD);
# loftq: fitted to a quantised base's rounding error (quant/loftq.py)
_PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")

# The write-ups' common mistakes, warned about (not refused): the scale alpha/r at or above 16 makes updates
# 8x larger than the usual alpha = 2r and is a known cause of divergence; at or below 1/8 the adapter barely
# moves at a usual learning rate. Dropout on a few hundred rows (a run of a few dozen steps) mostly adds noise.
SCALE_TOO_LARGE = 16.0
SCALE_TOO_SMALL = 1 / 8
TINY_DATA_ROWS = 500
# Set inside quiet_config_checks(): configs read from adapter files (trained already) and internal copies.
_QUIET: ContextVar[bool] = ContextVar("lorakit_quiet_config_checks", default=False)

# Used when target_modules is None: the attention projections PEFT also picks for these families.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}


@dataclass
class LoraConfig:
    """One adapter's hyper-parameters. Names follow the paper (r, alpha) and PEFT's config keys."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # suffixes, a regex, or "all-linear"
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    rslora: bool = False
    use_dora: bool = False  # DoRA: a trained magnitude per output feature on top of the LoRA direction
    bias: str = "none"
    init: str = "kaiming"
    loftq_iter: int = 1  # init="loftq": alternations of quantising the base and fitting B·A (1 keeps the base as loaded)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        for key, value in self.rank_pattern.items():
            _check_positive_int(f"rank_pattern[{key!r}]", value)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES and not (isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)):
            raise ConfigError(f"init must be one of {INIT_MODES} or 'pissa_niter_N' (N ≥ 1), got {self.init!r}")
        _check_positive_int("loftq_iter", self.loftq_iter)
        if self.use_dora and self.init not in ("kaiming", "gaussian"):
            # DoRA's magnitude starts at the norms of the base as loaded; pissa/olora (a residual base) and loftq
            # (a fitted B) would have to come first, which lorakit's DoRA does not do (it would ignore them)
            raise ConfigError(f"init={self.init!r} does not combine with use_dora=True in lorakit; DoRA supports init "
                              "'kaiming' or 'gaussian'")
        self.exclude_modules = _normalise_names("exclude_modules", self.exclude_modules)
        normalise_shared_fields(self)
        if not _QUIET.get():
            for message in self.common_mistakes():
                warnings.warn(message, ConfigWarning, stacklevel=3)  # points at the caller's LoraConfig(...)

    def common_mistakes(self) -> list[str]:
        """The write-ups' common mistakes this config makes, one sentence each with the fix (warned on creation).
        r above a layer's width needs the model (`inject` warns), dropout on tiny data the data (`lorakit train`)."""
        found = []
        pairs = {None: (self.r, self.alpha)}
        for key in dict.fromkeys([*self.rank_pattern, *self.alpha_pattern]):
            pairs[key] = (self.rank_pattern.get(key, self.r), self.alpha_pattern.get(key, self.alpha))
        for key, (r, alpha) in pairs.items():
            message = scale_mistake(r, alpha, self.rslora, "" if key is None else f" for {key!r}")
            if message:
                found.append(message)
        return found

    @property
    def method(self) -> str:
        """Which adapter class this config builds (lorakit.variants.ADAPTERS)."""
        return "dora" if self.use_dora else "lora"

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scale_for(self, module_name: str) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (which keeps the update's size stable as r grows)."""
        r = self.rank_for(module_name)
        return self.alpha_for(module_name) / (r**0.5 if self.rslora else r)

    # PEFT's adapter_config.json ---------------------------------------------------------------

    def to_peft_dict(self, target_modules: list[str] | str | None = None) -> dict[str, Any]:
        """The fields PEFT's `LoraConfig` reads; `target_modules` may be replaced by the resolved list."""
        targets = self.target_modules if target_modules is None else target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save,
            "use_rslora": self.rslora,
            "use_dora": self.use_dora,
            "bias": self.bias,
            "fan_in_fan_out": False,
            # A saved LoftQ adapter holds trained factors: PEFT must load them, not run LoftQ again (its convention).
            "init_lora_weights": True if self.init in ("kaiming", "loftq") else self.init,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """Build from an adapter_config.json written by PEFT (any version) or by lorakit; refuse what we cannot honour."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"peft_type is {d.get('peft_type')!r}; lorakit loads LoRA adapters (peft_type 'LORA') only")
        for flag in ("use_qalora",):
            if d.get(flag):
                raise ConfigError(f"this adapter uses {flag}=true, which lorakit does not support yet")
        if d.get("lora_bias"):
            raise ConfigError("this adapter uses lora_bias=true (a bias on lora_B), which lorakit does not support yet")
        check_peft_keys(d, PEFT_LORA_KEYS)
        init = d.get("init_lora_weights", True)
        return cls(
            r=int(d.get("r", 8)),
            alpha=d.get("lora_alpha", 8),
            dropout=float(d.get("lora_dropout") or 0.0),
            target_modules=d.get("target_modules"),
            exclude_modules=d.get("exclude_modules"),
            layers_to_transform=d.get("layers_to_transform"),
            layers_pattern=d.get("layers_pattern"),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
            modules_to_save=d.get("modules_to_save"),
            rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            bias=d.get("bias") or "none",
            init=_init_from_peft(init),
            task_type=d.get("task_type"),
            base_model_name_or_path=d.get("base_model_name_or_path"),
        )

    def replace(self, **changes: Any) -> "LoraConfig":
        with quiet_config_checks():  # the config was checked when it was made; a copy does not warn again
            return dataclasses.replace(self, **changes)


@contextlib.contextmanager
def quiet_config_checks():
    """LoraConfigs made inside do not warn about common mistakes: for adapter files (already trained, loading one
    is not the mistake) and the library's internal copies. Per thread and per asyncio task (a ContextVar)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def quiet_checks_on() -> bool:
    """True inside quiet_config_checks()."""
    return _QUIET.get()


def scale_mistake(r: int, alpha: float, rslora: bool = False, where: str = "") -> str | None:
    """One sentence naming the mistake and the fix when the scale alpha/r (alpha/sqrt(r) with rsLoRA) is at or
    above 16 or at or below 1/8, else None."""
    divisor, name = (math.sqrt(r), "alpha/sqrt(r)") if rslora else (r, "alpha/r")
    scale = alpha / divisor
    if SCALE_TOO_SMALL < scale < SCALE_TOO_LARGE:
        return None
    shown = f"{name} = {alpha:g}/{'sqrt(' + str(r) + ')' if rslora else r} = {scale:.3g}{where}"
    fix = f"set alpha = 2*sqrt(r) (alpha={2 * math.sqrt(r):.3g})" if rslora else f"set alpha = 2*r (alpha={2 * r})"
    if scale >= SCALE_TOO_LARGE:
        return (f"LoraConfig: {shown}, an update scaled {scale:.3g}x, which the LoRA write-ups list as a common cause "
                f"of loss spikes and divergence; {fix}")
    rs = alpha / math.sqrt(r)
    if not rslora and r >= 32 and SCALE_TOO_SMALL < rs < SCALE_TOO_LARGE:  # rsLoRA is meant for large ranks
        fix += f", or keep alpha with rslora=True (alpha/sqrt(r) = {rs:.3g})"
    return (f"LoraConfig: {shown}, an update scaled down {1 / scale:.3g}x, so the adapter barely moves at a usual "
            f"learning rate (a common mistake in the LoRA write-ups); {fix}")


def check_dropout_for_data(dropout: float, rows: int) -> str | None:
    """Warn (and return the sentence) when LoRA dropout is set for fewer than TINY_DATA_ROWS training rows."""
    if not dropout or rows >= TINY_DATA_ROWS:
        return None
    message = (f"LoRA dropout {dropout:g} with only {rows} training rows: on a run this short dropout mostly adds noise "
               f"to the few updates it makes (a common mistake in the LoRA write-ups); set dropout 0 (--dropout 0) and "
               f"regularise by training fewer steps")
    warnings.warn(message, ConfigWarning, stacklevel=2)
    return message


def _init_from_peft(value: Any) -> str:
    """PEFT's init_lora_weights → ours. `True`/`False` both mean random A (False also makes B random in PEFT, for
    tests only; the file's trained B is loaded over it either way)."""
    if value in (True, False, None):
        return "kaiming"
    if value in INIT_MODES or (isinstance(value, str) and _PISSA_NITER.fullmatch(value)):
        return value
    raise ConfigError(f"init_lora_weights={value!r} is an initialisation lorakit does not support; "
                      f"supported: True, {', '.join(repr(m) for m in INIT_MODES[1:])}, 'pissa_niter_N'")


def normalise_shared_fields(config) -> None:
    """Check and normalise the fields every method's config shares with PEFT's: targets, layer indices,
    saved modules, and the classification head that SEQ_CLS trains in full."""
    config.target_modules = _normalise_names("target_modules", config.target_modules)
    if isinstance(config.target_modules, list) and not config.target_modules:
        raise ConfigError("target_modules is an empty list: name at least one module, e.g. ['q_proj', 'v_proj']")
    if isinstance(config.layers_to_transform, int):
        config.layers_to_transform = [config.layers_to_transform]
    if config.layers_to_transform is not None:
        config.layers_to_transform = [int(i) for i in config.layers_to_transform]
    if isinstance(config.modules_to_save, str):
        config.modules_to_save = [config.modules_to_save]
    if config.task_type == "SEQ_CLS":  # as PEFT does: a new classification head must be trained in full
        config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + ["classifier", "score"]))


# adapter_config.json keys of PEFT's LoraConfig (0.4 to 0.21) that lorakit reads, or that do not change what a
# trained adapter computes (metadata, initialisation-only settings, run-time options).
PEFT_LORA_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "modules_to_save", "use_rslora", "use_dora", "use_qalora", "lora_bias", "bias",
    "fan_in_fan_out", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "merge_weights",
}
# Keys that change the math when set: refused by name (value -> what it means), unless at their neutral value.
PEFT_MATH_KEYS = {
    "layer_replication": "copies of decoder layers sharing weights",
    "trainable_token_indices": "trained rows of the token embeddings",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE experts)",
    "alora_invocation_tokens": "activated LoRA (the adapter runs only after given tokens)",
    "megatron_config": "Megatron tensor-parallel layers",
    "enable_lora": "the old MergedLinear layout (one LoRA per part of a fused projection)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA (singular-value adaptation)",
    "velora_config": "VeLoRA",
}
_WARNED: set[str] = set()


def check_peft_keys(d: dict[str, Any], known: set[str]) -> None:
    """Refuse a key that changes what the adapter computes (by name); warn once per process about each key this
    lorakit does not know (e.g. from a newer PEFT) and ignore it."""
    for key, value in d.items():
        if key in PEFT_MATH_KEYS and value not in (None, False, [], {}, 0):
            raise ConfigError(f"this adapter sets {key}={value!r} ({PEFT_MATH_KEYS[key]}), which changes what it computes "
                              "and which lorakit does not support; load it with PEFT instead")
        if key not in known and key not in PEFT_MATH_KEYS and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"adapter_config.json has a key lorakit does not know, {key!r} (from a newer PEFT or another "
                          "tool?); it is ignored", stacklevel=3)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _normalise_names(field_name: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as e:
                raise ConfigError(f"{field_name}={value!r} is not a valid regular expression: {e}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = list(value)
        if not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"{field_name} must hold non-empty strings, got {value!r}")
        return sorted(set(names)) if isinstance(value, (set, frozenset)) else names
    raise ConfigError(f"{field_name} must be a list of module names, a regex string or 'all-linear', got {value!r}")


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module whose full name ends with it (at a dot boundary)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module_name):
            return value
    return default
