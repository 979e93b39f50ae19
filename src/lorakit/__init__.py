"""lorakit: LoRA for any PyTorch model — adapt, train, keep in PEFT's format, merge or serve many adapters."""

from .adapters import (
    active_adapters,
    adapter_rows,
    delete_adapter,
    disabled,
    is_merged,
    list_adapters,
    set_active,
    set_trainable,
)
from .compose.combine import combine_adapters
from .compose.extract import extract_adapter
from .compose.mixture import add_mixture, load_mixture, mixture_balance_loss, save_mixture
from .compose.resize import resize_adapter
from .config import LoraConfig
from .convert import adalora_to_lora, pissa_to_lora
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    LorakitError,
    MergeStateError,
    MissingDependencyError,
    ShapeMismatchError,
    TargetModulesNotFoundError,
)
from .hf import load_base_model
from .inject import inject, trainable_parameters
from .io import check_adapter_files, load_adapter, read_adapter_config, save_adapter
from .layers import LoraLayer
from .merge import merge, merge_and_unload, unload, unmerge
from .variants.mixture import MixtureConfig
from .plan import plan_memory
from .variants.adalora import AdaLoraConfig
from .variants.adalora_budget import adalora_orth_loss, adalora_step
from .variants import VeraConfig
from .recommend import recommend_config
from .train.diagnostics import diagnose_run as diagnose

add_adapter = inject  # the same operation under the name people look for

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "VeraConfig", "LoraLayer", "inject", "add_adapter", "load_adapter", "save_adapter", "read_adapter_config",
    "set_active", "set_trainable", "adapter_rows", "check_adapter_files", "active_adapters", "list_adapters", "delete_adapter", "disabled", "is_merged",
    "merge", "unmerge", "unload", "merge_and_unload", "trainable_parameters", "load_base_model", "diagnose",
    "combine_adapters", "resize_adapter", "extract_adapter",
    "MixtureConfig", "add_mixture", "save_mixture", "load_mixture", "mixture_balance_loss",
    "plan_memory", "recommend_config",
    "AdaLoraConfig", "adalora_step", "adalora_orth_loss", "adalora_to_lora", "pissa_to_lora",
    "LorakitError", "ConfigError", "TargetModulesNotFoundError", "AdapterNotFoundError", "AdapterExistsError",
    "AdapterFileError", "AdapterFileNotFoundError", "IncompatibleAdapterError", "ShapeMismatchError", "MergeStateError",
    "MissingDependencyError",
]
