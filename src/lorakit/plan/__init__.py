"""The memory planner: how much memory full fine-tuning, LoRA and QLoRA need, and serving N adapters, from a config."""

from .planner import MemoryPlan, MethodMemory, ServingMemory, plan_memory

__all__ = ["plan_memory", "MemoryPlan", "MethodMemory", "ServingMemory"]
