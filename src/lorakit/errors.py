"""Exceptions lorakit raises for user mistakes: one type per kind of mistake, each message says what to do."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A LoraConfig (or a flag that builds one) has an invalid value."""


class TargetModulesNotFoundError(LorakitError, ValueError):
    """`target_modules` matched no module of the model."""


class BaseModelError(LorakitError, ValueError):
    """A base model path that is missing, not a model directory, or lacks the files a command needs."""


class ChatTemplateError(LorakitError, ValueError):
    """A conversation that the tokenizer's chat template cannot render (or a tokenizer without a template)."""


class AdapterNotFoundError(LorakitError, KeyError):
    """An adapter name that the model does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(LorakitError, ValueError):
    """Adding an adapter under a name that is already taken."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter directory or file is missing, corrupt, or not a LoRA adapter."""


class AdapterFileNotFoundError(AdapterFileError, FileNotFoundError):
    """An adapter directory or one of its files does not exist."""


class IncompatibleAdapterError(LorakitError, ValueError):
    """An adapter file was written for another architecture than the model it is loaded into."""


class ShapeMismatchError(IncompatibleAdapterError):
    """A tensor does not fit the layer it names."""


class MergeStateError(LorakitError, RuntimeError):
    """An operation that needs merged (or unmerged) weights was called in the other state."""


class ModelConfigError(LorakitError, ValueError):
    """A model config (config.json) is missing, unreadable, or lacks a key a plan needs."""


class DeviceError(LorakitError, ValueError):
    """A `--device` (or `device=`) that is malformed, or names a GPU this machine does not have."""
