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
from .config import LoraConfig
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    LorakitError,
    MergeStateError,
    ShapeMismatchError,
    TargetModulesNotFoundError,
)
from .inject import inject, trainable_parameters
from .io import check_adapter_files, load_adapter, read_adapter_config, save_adapter
from .layers import LoraLayer
from .merge import merge, merge_and_unload, unload, unmerge
from .train.diagnostics import diagnose_run as diagnose

add_adapter = inject  # the same operation under the name people look for

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "inject", "add_adapter", "load_adapter", "save_adapter", "read_adapter_config",
    "set_active", "set_trainable", "adapter_rows", "check_adapter_files", "active_adapters", "list_adapters", "delete_adapter", "disabled", "is_merged",
    "merge", "unmerge", "unload", "merge_and_unload", "trainable_parameters", "diagnose",
    "LorakitError", "ConfigError", "TargetModulesNotFoundError", "AdapterNotFoundError", "AdapterExistsError",
    "AdapterFileError", "AdapterFileNotFoundError", "IncompatibleAdapterError", "ShapeMismatchError", "MergeStateError",
]
