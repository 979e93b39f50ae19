"""Adapters as building blocks: combine several into one, resize an adapter's rank, extract a LoRA from a full
fine-tune, and mixtures of LoRAs that route tokens between frozen experts."""
