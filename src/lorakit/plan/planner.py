"""`plan_memory`: training memory per part for full fine-tuning, LoRA and QLoRA, and serving memory, from a config alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..config import LoraConfig
from ..errors import ConfigError
from .activations import Shape, Step, activation_memory
from .census import AdapterCensus, BaseCensus, count_adapter, count_base
from .meta import build_meta_model, load_config
from .storage import OPTIMIZERS, dtype_bytes, nf4_bytes, optimizer_bytes, optimizer_step_temporaries

METHODS = ("full", "lora", "qlora")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class MethodMemory:
    """One training method's memory, in bytes. `peak` is what the step needs at its fullest moment."""

    method: str
    trainable: int
    weights: int  # the base as stored: the model dtype, or NF4 + quantisation constants for the linear layers
    adapter: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward at the end of the forward pass
    temporaries: int  # what else is alive at the peak: the loss's fp32 buffers, a block's backward, optimizer scratch
    peak: int
    peak_at: str  # "backward" or "optimizer step"


@dataclass
class ServingMemory:
    adapters: int
    base: int  # one copy of the base in the model dtype
    base_4bit: int  # the same base with NF4 linear layers
    adapter_each: int

    @property
    def shared(self) -> int:
        return self.base + self.adapters * self.adapter_each

    @property
    def shared_4bit(self) -> int:
        return self.base_4bit + self.adapters * self.adapter_each

    @property
    def merged(self) -> int:
        return self.adapters * self.base


@dataclass
class MemoryPlan:
    model_type: str
    dtype: torch.dtype
    lora: LoraConfig
    base: BaseCensus
    adapter: AdapterCensus
    batch: int
    seq: int
    gradient_checkpointing: bool
    optim: str
    device: str
    methods: dict[str, MethodMemory]
    serving: ServingMemory
    notes: list[str] = field(default_factory=list)
    shape: Shape | None = field(default=None, repr=False)  # the sizes activations depend on (for replan)

    def format(self) -> str:
        from .report import format_plan

        return format_plan(self)


def plan_memory(model_or_config, method: str = "all", rank: int = 8, alpha: float | None = None, targets=None,
                batch: int = 1, seq: int = 512, gradient_checkpointing: bool = False, optim: str = "adamw",
                serve_adapters: int = 10, dtype: torch.dtype | str | None = None, device: str = "cuda",
                lora_config: LoraConfig | None = None) -> MemoryPlan:
    """Plan the memory of training (full FT, LoRA, QLoRA) and serving a model, from its config alone.

    `model_or_config`: a model directory, a config.json path, "builtin", a transformers config or model. The model
    is built on the meta device and LoRA is injected with lorakit's own `inject`, so the targets and
    counts are exactly what training would get; no weight is read. `dtype` is the model's dtype
    (default: the config's, else fp32); QLoRA's adapters and compute use it too. `device` ("cuda" or
    "cpu") decides the optimizer's scratch memory and whether the CPU-repacked NF4 layout applies.
    `lora_config`: a whole LoraConfig (layers_to_transform, rank_pattern, ...) instead of rank/alpha/targets.
    """
    methods = _methods(method)
    if optim not in OPTIMIZERS:
        raise ConfigError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")
    for name, value in (("batch", batch), ("seq", seq), ("rank", rank)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    config = load_config(model_or_config)
    dtype = _dtype(dtype if dtype is not None else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    lora = lora_config or LoraConfig(r=rank, alpha=alpha if alpha is not None else 2 * rank, target_modules=targets)
    model = build_meta_model(config).to(dtype)
    base = count_base(model)
    adapter = count_adapter(model, lora)
    shape = Shape.from_config(config)
    pb, pa = dtype_bytes(dtype), dtype_bytes(adapter.dtype)

    rows = {}
    for m in methods:
        rows[m] = _method_memory(m, shape, base, adapter, pb, pa, batch, seq, gradient_checkpointing, optim, device)
    serving = ServingMemory(serve_adapters, base.total * pb, _nf4_base(base, pb), adapter.trainable * pa)
    return MemoryPlan(config.model_type, dtype, lora, base, adapter, batch, seq, gradient_checkpointing, optim, device,
                      rows, serving, _notes(config, shape, base, pb, device, methods, optim), shape)


def replan(plan: MemoryPlan, batch: int | None = None, seq: int | None = None,
           gradient_checkpointing: bool | None = None, optim: str | None = None) -> MemoryPlan:
    """The same model and adapter at another step (batch, seq, checkpointing, optimizer), without building the model
    again: the census does not change, only the arithmetic on it (a 70B model takes seconds to build, this microseconds)."""
    change = {k: v for k, v in (("batch", batch), ("seq", seq), ("gradient_checkpointing", gradient_checkpointing),
                                ("optim", optim)) if v is not None}
    new = dataclasses.replace(plan, **change)
    if new.optim not in OPTIMIZERS:
        raise ConfigError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {new.optim!r}")
    for name in ("batch", "seq"):
        if not isinstance(getattr(new, name), int) or getattr(new, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(new, name)!r}")
    pb, pa = dtype_bytes(new.dtype), dtype_bytes(new.adapter.dtype)
    new.methods = {m: _method_memory(m, new.shape, new.base, new.adapter, pb, pa, new.batch, new.seq,
                                     new.gradient_checkpointing, new.optim, new.device) for m in plan.methods}
    new.notes = _notes(SimpleNamespace(model_type=new.model_type), new.shape, new.base, pb, new.device,
                       tuple(plan.methods), new.optim)
    return new


def _method_memory(method, shape, base, adapter, pb, pa, batch, seq, checkpointing, optim, device) -> MethodMemory:
    if method == "full":
        trainable, sizes, tb = base.total, base.sizes, pb
        weights, adapter_bytes = base.total * pb, 0
        step = Step(batch, seq, pb, pb, full=True)
        modules = []
        scratch = 0
    else:
        # QLoRA's adapters are in the compute dtype (the model dtype); LoRA's are what lorakit chose.
        tb = pb if method == "qlora" else pa
        trainable, sizes = adapter.trainable, adapter.sizes
        weights = _nf4_base(base, pb) if method == "qlora" else base.total * pb
        adapter_bytes = trainable * tb
        step = Step(batch, seq, pb, tb, full=False)
        modules = adapter.modules
        biggest = max((a.in_features * a.out_features for a in modules), default=0)
        # LoRA in fp32 folds scale·B·A into a temporary copy of an adapted weight for long batches (fused.py);
        # every 4-bit layer de-quantises its weight to the compute dtype for the matmul. One layer at a time.
        scratch = biggest * 4 if method == "lora" and pb == 4 else (base.largest_linear * pb if method == "qlora" else 0)
    act = activation_memory(shape, step, modules, checkpointing)
    gradients = trainable * tb
    optimizer = optimizer_bytes(sizes, tb, optim)
    fixed = weights + adapter_bytes + optimizer
    during_backward = act.peak + scratch
    at_step = gradients + optimizer_step_temporaries(sizes, tb, optim, device)
    # zero_grad(set_to_none=True) frees the gradients after each step, and backward frees each block's
    # activations as it makes that block's gradients: the two peaks are separate moments.
    if during_backward >= at_step:
        peak, at, held = fixed + during_backward, "backward", act.saved
    else:
        peak, at, held = fixed + at_step, "optimizer step", gradients
    return MethodMemory(method, trainable, weights, adapter_bytes, gradients, optimizer, act.saved,
                        peak - fixed - held, peak, at)


def _nf4_base(base: BaseCensus, pb: int) -> int:
    return sum(nf4_bytes(o, i) for o, i in base.linear_shapes) + (base.total - base.linear) * pb


def _methods(method: str) -> tuple[str, ...]:
    if method == "all":
        return METHODS
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)} or 'all', got {method!r}")
    return (method,)


def _dtype(value) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point dtype, got {value}")
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")


def _notes(config, shape, base, pb, device, methods, optim) -> list[str]:
    notes = []
    if not shape.exact:
        notes.append(f"activations: the formula is written for Llama-style decoders; for {config.model_type} it is an estimate")
    if "qlora" in methods:
        packed = sum(nf4_bytes(o, i, cpu_packed=True) for o, i in base.linear_shapes)
        std = sum(nf4_bytes(o, i) for o, i in base.linear_shapes)
        notes.append(f"QLoRA weights: NF4 + double quantisation, {std / max(base.linear, 1):.4f} B per linear weight "
                     f"(+ {base.total - base.linear:,} unquantised parameters at {pb} B)")
        if device == "cpu":
            notes.append(f"on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the 4-bit weights at the first no-grad "
                         f"forward (an evaluation): {packed / max(base.linear, 1):.4f} B per linear weight, "
                         f"+{(packed - std) / 2**20:,.1f} MiB; training steps alone keep the standard layout")
    if optim == "adamw" and device == "cuda" and "full" in methods:
        notes.append("full FT's optimizer step assumes torch.optim.AdamW's default foreach kernels, whose scratch is one "
                     "more copy of the trainable parameters; AdamW(fused=True) or an 8-bit optimizer avoids it")
    notes.append("not included: the framework itself (CUDA context, Python and libraries), a KV cache, data loading")
    return notes
