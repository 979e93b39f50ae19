"""Where a command runs: `--device auto|cpu|cuda|cuda:N`, resolved and checked in one place for every command.

`auto` is `$LORAKIT_DEVICE` when that is set (the test suite sets it to `cpu`), else the current CUDA device when
CUDA is available, else the CPU. Library functions take a model where it is and put the tensors they create
beside its weights; only the commands (and functions that load a model from a directory) choose a device.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from .errors import DeviceError

ENV = "LORAKIT_DEVICE"
CHOICES = "auto|cpu|cuda|cuda:N"
_SPEC = re.compile(r"(cpu|cuda)(?::(\d+))?")
_INSTALL = "https://pytorch.org/get-started/locally/"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device that `spec` names, checked to exist here; a DeviceError says what was found and what to pass."""
    text = str(spec if spec is not None else "auto").strip().lower()
    if text == "auto":
        chosen = os.environ.get(ENV, "").strip()
        if chosen and chosen.lower() != "auto":
            try:
                return resolve_device(chosen)
            except DeviceError as e:
                raise DeviceError(f"${ENV} (what --device auto means here): {e}") from None
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    kind, index = parse_device(spec)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {text!r}: {no_cuda_reason()}. Pass --device cpu (or auto, which picks the CPU here), "
                          f"or install a CUDA build of PyTorch ({_INSTALL})")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if index is None else index
    if index >= count:
        raise DeviceError(f"device {text!r}: this machine has {count} CUDA device(s) ({_gpu_names(count)}); pass "
                          f"{'cuda:0' if count == 1 else f'cuda:0 to cuda:{count - 1}'}, or cuda for the current one")
    return torch.device("cuda", index)


def parse_device(spec: str | torch.device) -> tuple[str, int | None]:
    """("cpu" | "cuda", index or None) for a device spelled as lorakit accepts it (availability is not checked)."""
    text = str(spec).strip().lower()
    m = _SPEC.fullmatch(text)
    if m is None or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise DeviceError(f"device {str(spec)!r} is not one lorakit runs on; pass {CHOICES.replace('|', ', ')} "
                          "(N: a GPU's index, as nvidia-smi lists them)")
    return m.group(1), int(m.group(2)) if m.group(1) == "cuda" and m.group(2) is not None else None


def check_device_spec(spec: str) -> str:
    """`spec` if it is `auto` or a device lorakit accepts (for configs, which may be written on another machine)."""
    if str(spec).strip().lower() != "auto":
        parse_device(spec)
    return spec


def no_cuda_reason() -> str:
    """Why torch sees no GPU, in words: a CPU-only build, or a CUDA build that finds no device."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"no CUDA GPU is available: this PyTorch ({torch.__version__}) is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
    return (f"no CUDA GPU is available: PyTorch {torch.__version__} (built for {built}{hidden}) finds none; "
            "check the driver with nvidia-smi")


def describe(device: torch.device) -> str:
    """`cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu`: for the line a run prints and metrics.json records."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def check_bf16(device: torch.device) -> None:
    """bf16 compute needs a GPU that has it (Ampere or newer); the CPU always runs it."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceError(f"--precision bf16: {describe(device)} has no bfloat16 arithmetic (it needs an Ampere or "
                          "newer GPU); use --precision fp32")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's weights (its first parameter, else its first buffer; the CPU for an empty module)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def seeded_gpus() -> list[int]:
    """The GPUs whose generators `torch.manual_seed` reseeds, for `fork_rng(devices=...)` (none before CUDA starts)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def add_device_argument(parser, default: str | None = "auto") -> None:
    parser.add_argument("--device", default=default, metavar=CHOICES,
                        help="where to run: auto (the default: the GPU when CUDA is available, else the CPU; "
                             f"${ENV} overrides what auto picks), cpu, cuda (the current GPU) or cuda:N")


def add_threads_argument(parser, help: str) -> None:
    """`--threads N` (a positive integer, checked by argparse: torch.set_num_threads would raise a traceback)."""
    parser.add_argument("--threads", type=_positive_threads, default=None, metavar="N", help=help)


def _positive_threads(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of CPU threads, got {text!r}")
    return value


def _gpu_names(count: int) -> str:
    names = []
    for i in range(count):
        try:
            names.append(f"cuda:{i} {torch.cuda.get_device_name(i)}")
        except (RuntimeError, AssertionError):  # a name is a courtesy; the count is what the message needs
            names.append(f"cuda:{i}")
    return ", ".join(names)
