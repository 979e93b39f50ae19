"""`lorakit demo`: the core round trip on a tiny built-in Llama — inject, train, save, reload, merge, compare."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from . import LoraConfig, inject, load_adapter, merge, save_adapter, trainable_parameters, unmerge
from .device import describe, resolve_device
from .hf import load_base_model


def tiny_llama_dir(root: Path, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-64 Llama with random weights to `root` through save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(root)
    return root


def run_demo(steps: int = 60, device: str | torch.device = "auto") -> dict[str, float | bool]:
    t0 = time.perf_counter()
    device = resolve_device(device)
    print(f"device: {describe(device)}")
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = tiny_llama_dir(Path(tmp) / "base")
        model = load_base_model(base_dir, "CAUSAL_LM").to(device)
        torch.manual_seed(0)
        seq = torch.randint(0, 256, (4, 32)).to(device)  # the "data set": four random sequences to memorise
        with torch.no_grad():
            base_loss = model(seq, labels=seq).loss.item()
        inject(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
        print("injected LoRA into every linear layer:")
        trainable_parameters(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(steps):
            loss = model(seq, labels=seq).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 20 == 0 or step == steps - 1:
                print(f"  step {step:3d}  loss {loss.item():.4f}")
        model.eval()
        adapter_dir = save_adapter(model, Path(tmp) / "adapter")
        print(f"saved adapter: {sorted(p.name for p in adapter_dir.iterdir())}")
        with torch.no_grad():
            trained = model(seq).logits
            fresh = load_adapter(load_base_model(base_dir, "CAUSAL_LM").to(device), adapter_dir)
            reloaded = fresh(seq).logits
            merge(fresh)
            merged = fresh(seq).logits
            unmerge(fresh)
            after_unmerge = fresh(seq).logits
            final_loss = fresh(seq, labels=seq).loss.item()
    result = {
        "base_loss": base_loss,
        "trained_loss": final_loss,
        "reload_max_diff": (reloaded - trained).abs().max().item(),
        "merged_max_diff": (merged - trained).abs().max().item(),
        "unmerge_max_diff": (after_unmerge - trained).abs().max().item(),
        "seconds": time.perf_counter() - t0,
    }
    print(f"loss on the training sequences: base {result['base_loss']:.3f} -> adapted {result['trained_loss']:.3f}")
    print(f"max |logit difference|: reloaded vs trained {result['reload_max_diff']:.2e}, "
          f"merged vs unmerged {result['merged_max_diff']:.2e}, after unmerge {result['unmerge_max_diff']:.2e}")
    result["ok"] = result["reload_max_diff"] < 1e-5 and result["merged_max_diff"] < 1e-4 and result["trained_loss"] < base_loss
    print(("OK" if result["ok"] else "MISMATCH") + f": round trip done in {result['seconds']:.1f}s")
    return result
