"""`TrainConfig`: every `lorakit train` setting, from flags and/or a YAML/TOML/JSON file, validated on creation."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..device import check_device_spec
from ..errors import ConfigError

TASKS = ("causal-lm", "classify")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
QUANTIZE = ("nf4", "int8")  # a 4-bit NF4 (QLoRA) or 8-bit LLM.int8 base, through bitsandbytes
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")  # the 8-bit ones are bitsandbytes' (train/optimizers.py)
# What trains: "lora" (an adapter), "dora" (a DoRA adapter), "adalora" (an adapter whose ranks move), "vera" (a
# VeRA adapter), "full" (every weight), "mixture" (routers over frozen experts). A new method adds its name here
# and its behaviour (which weights train, how they are saved and restored) to train/methods.py::METHODS.
METHODS = ("lora", "dora", "adalora", "vera", "full", "mixture")
# Settings that only mean something for an adapter: --method full refuses them.
LORA_ONLY = ("rank", "alpha", "dropout", "targets", "layers_to_transform", "rslora", "init", "lora_plus_ratio",
             "quantize")
# Written into train_config.json for the record (what the run adapted), ignored when the file is read back.
RECORD_ONLY = ("adapted_modules",)
# Defaults that differ by method, applied by `lorakit train` under its flags and --config file (and over the
# built-in demo's settings). VeRA trains two vectors per layer around a frozen random projection: it takes
# r=256 and a far higher learning rate than LoRA (on the demo: 66.7% exact match at 1e-2, 84.2% at 3e-2).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"vera": {"rank": 256, "lr": 3e-2}}
# The --init values each method honours. lora: every LoraConfig init ("pissa_niter_N" included); full: none (it has
# no adapter: LORA_ONLY). DoRA's magnitude starts at the norms of the base as loaded, which pissa/olora (a residual
# base) and loftq (a fitted B) would change; AdaLoRA and VeRA start their own way (E = 0; λ_b = 0) and mixture trains
# routers only.
INITS: dict[str, tuple[str, ...]] = {"lora": ("kaiming", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq"),
                                     "dora": ("kaiming", "gaussian"), "adalora": ("kaiming",), "vera": ("kaiming",),
                                     "mixture": ("kaiming",)}
# Plain-LoRA settings VeRA has no use for (its λ vectors carry the scale; it has no B factor to speed up).
NOT_VERA = ("alpha", "rslora", "lora_plus_ratio")


@dataclass
class TrainConfig:
    base: str | None = None  # None or "builtin": the built-in pretrained model
    data: str | None = None  # None: the bundled data set
    eval_data: str | None = None  # a held-out file; None: hold out eval_fraction of `data`
    task: str = "causal-lm"
    out: str = "runs/lorakit"
    method: str = "lora"
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    rslora: bool = False
    # kaiming | gaussian | pissa | pissa_niter_N | olora | loftq (LoraConfig.init). loftq: fitted to the quantised
    # base's rounding error (needs --quantize); one LoftQ iteration: more would re-quantise the base's weights, which
    # an adapter file cannot carry (the library's LoraConfig allows them).
    init: str = "kaiming"
    quantize: str | None = None  # nf4 | int8: QLoRA on a quantised base
    # mixture of LoRAs (--mixture NAME=DIR ...): frozen experts, only the per-layer routers train
    mixture: dict[str, str] | None = None
    top_k: int | None = None
    load_balance: float = 0.01
    # optimisation
    max_steps: int = 100
    epochs: float | None = None  # when set, decides max_steps from the training rows
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    optim: str = "adamw"
    lora_plus_ratio: float | None = None  # LoRA+: B learns at lr·ratio (the paper suggests 16)
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (lorakit.device); under torchrun, one GPU per process
    gradient_checkpointing: bool | None = None  # None: on with --quantize (QLoRA's memory saver), else off
    seed: int = 0
    split_seed: int | None = None  # which rows are held out; None: --seed (set it to vary --seed on one held-out set)
    # data
    max_length: int = 256
    packing: bool = False
    chat_template: bool = False  # prompt/completion rows through the tokenizer's chat template too
    skip_bad_rows: bool = False  # else a malformed row stops the run before it starts
    eval_fraction: float = 0.1
    max_eval: int | None = 200
    # bookkeeping
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False  # replace a finished or interrupted run in `out`
    exact_match: bool = True  # causal-lm prompt/completion data: generate and compare on the eval split
    compare_base: bool = False  # evaluate the base model before training too (the default demo does)

    def __post_init__(self) -> None:
        if self.mixture is not None and self.method == "lora":
            self.method = "mixture"  # --mixture alone says what trains
        if self.method == "mixture" and not self.mixture:
            raise ConfigError("--method mixture needs its experts: --mixture NAME=DIR NAME=DIR ...")
        if self.mixture is not None and self.method != "mixture":
            raise ConfigError(f"--mixture trains routers over frozen experts; it cannot be combined with --method {self.method}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_device_spec(self.device)  # its spelling only: a config may be written on another machine
        for name, allowed in (("quantize", QUANTIZE + (None,)), ("optim", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        allowed = INITS.get(self.method)
        if allowed is not None and self.init not in allowed and not (
                "pissa_niter_N" in allowed and re.fullmatch(r"pissa_niter_[1-9][0-9]*", str(self.init))):
            raise ConfigError(f"--init {self.init} does not apply to --method {self.method}, which supports --init "
                              f"{' | '.join(allowed)}; drop --init or pick one of these")
        if self.init == "loftq" and self.quantize is None:
            raise ConfigError("--init loftq fits the adapter to a quantised base's rounding error; add --quantize nf4")
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.quantize is not None
        for name in ("max_steps", "batch_size", "grad_accum", "rank", "max_length", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("save_every", "eval_every", "warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ConfigError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                              "--overwrite replaces it with a new one from step 0; pass one of them")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.lora_plus_ratio is not None and self.lora_plus_ratio <= 0:
            raise ConfigError(f"lora_plus_ratio must be positive, got {self.lora_plus_ratio!r}")
        if isinstance(self.targets, str) and "," in self.targets:
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.method == "full":
            changed = [name for name in LORA_ONLY if getattr(self, name) != defaults[name]]
            if changed:
                raise ConfigError(full_refusal(changed))
        if self.method == "vera":
            changed = [name for name in NOT_VERA if getattr(self, name) != defaults[name]]
            if changed:
                raise ConfigError(f"{', '.join(changed)}: plain-LoRA setting(s) that --method vera has no use for "
                                  "(VeRA's trained vectors carry the scale, and it has no B factor); drop them")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.method == "full":  # so that a full run's train_config.json works as --config
            values = {k: v for k, v in values.items() if k not in LORA_ONLY}
        return values


def full_refusal(names: list[str]) -> str:
    flags = ", ".join("--" + ("layers" if n == "layers_to_transform" else n.replace("_", "-")) for n in names)
    return (f"{flags}: LoRA setting(s) that --method full cannot use (it trains every weight of the model, with no "
            "adapter); drop them, or train an adapter with --method lora")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .yaml/.yml, .toml or .json file; keys are flag names (dashes or underscores)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files must end in .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as e:  # yaml/toml/json each raise their own error types
        raise ConfigError(f"{path} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items() if k not in RECORD_ONLY}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return data


def resolve(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file, then flags given on the command line (flags win)."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    return TrainConfig(**merged)
