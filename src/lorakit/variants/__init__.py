"""The LoRA family: which adapter class each method uses and which config class reads each PEFT file type.

Every variant is one file here whose adapter follows the contract documented on `layers.LoraAdapter`;
adding one means adding its class to the two tables below.
"""

from __future__ import annotations

from typing import Any

from ..config import LoraConfig
from ..errors import ConfigError
from ..layers import LoraAdapter
from .adalora import AdaLoraAdapter, AdaLoraConfig
from .dora import DoraAdapter
from .mixture import MixtureAdapter
from .pissa import ResidualInitAdapter, is_residual_init
from .vera import VeraAdapter, VeraConfig

# config.method -> the adapter class built on every target layer
ADAPTERS: dict[str, type] = {"lora": LoraAdapter, "dora": DoraAdapter, "adalora": AdaLoraAdapter, "vera": VeraAdapter,
                             "mixture": MixtureAdapter}
# adapter_config.json's peft_type -> the config class that reads it
CONFIGS: dict[str, type] = {"LORA": LoraConfig, "ADALORA": AdaLoraConfig, "VERA": VeraConfig}


def adapter_class(config) -> type:
    if config.method == "lora" and is_residual_init(getattr(config, "init", "")):
        return ResidualInitAdapter  # PiSSA / OLoRA: plain LoRA that starts from W0's principal part
    try:
        return ADAPTERS[config.method]
    except KeyError:
        raise ConfigError(f"lorakit has no adapter for method {config.method!r}; known: {sorted(ADAPTERS)}") from None


def config_from_peft(d: dict[str, Any]):
    """The config an adapter_config.json describes (PEFT's or ours), by its peft_type."""
    peft_type = d.get("peft_type", "LORA")
    cls = CONFIGS.get(peft_type)
    if cls is None:
        raise ConfigError(f"peft_type is {peft_type!r}; lorakit loads {', '.join(sorted(CONFIGS))} adapters")
    return cls.from_peft_dict(d)
