"""How many bytes a training step keeps for backward, tensor by tensor, for a Llama-style decoder.

Each term below is a tensor autograd saves in transformers' Llama layer (RMSNorm, SDPA attention, gated
MLP), counted once per storage; tests/test_plan.py checks the sum against the saved tensors of a real
forward pass (through `saved_tensors_hooks`), and bench/memory.py checks the resulting peak against RSS.

Why LoRA still stores most activations: a frozen layer keeps no input for a weight gradient, but the
gradient must still flow *through* it to reach the adapters below, so the non-linearities (RMSNorm,
attention, SiLU·up) keep their inputs. What LoRA drops is the inputs saved only for frozen weights'
gradients (the normalised hidden state before the norm's weight, the inputs of frozen projections),
and every block below the lowest adapted one (nothing there needs a gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

from .census import Adapted

F32 = 4  # RMSNorm upcasts to fp32, SDPA's log-sum-exp and the loss's log-softmax are fp32 whatever the model dtype
ATTN_INPUT = ("q_proj", "k_proj", "v_proj")  # share the normalised input of the attention
MLP_INPUT = ("gate_proj", "up_proj")  # share the normalised input of the MLP
KNOWN_LEAVES = ATTN_INPUT + MLP_INPUT + ("o_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder that activation memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    exact: bool  # the formula was written for this family (Llama-style); else it is an estimate

    @classmethod
    def from_config(cls, config) -> "Shape":
        h = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
        kv = getattr(config, "num_key_value_heads", None) or heads
        gated = getattr(config, "model_type", "") in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")
        return cls(h, inter, config.num_hidden_layers, heads, kv, head_dim, config.vocab_size, gated)


@dataclass(frozen=True)
class Step:
    """One training step's setting: tokens, dtypes (bytes per element), full fine-tuning or adapters."""

    batch: int
    seq: int
    act_bytes: int  # the model's dtype: activations are stored in it
    adapter_bytes: int  # the adapters' dtype; when it differs, lorakit's LoRA path keeps its own cast copy of the input
    full: bool

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Activations:
    saved: int  # bytes held for backward at the end of the forward pass (with checkpointing: the checkpoints)
    peak: int  # the most activation-related bytes alive at once during forward + backward
    largest_block: int  # one block's saved tensors (what a checkpointed block recomputes)


def block_saved(s: Shape, step: Step, adapted: dict[str, Adapted], grad_in: bool) -> tuple[int, bool]:
    """Bytes one decoder block saves for backward, and whether its output needs a gradient."""
    T, e, h, i = step.tokens, step.act_bytes, s.hidden, s.intermediate
    q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
    fused = step.adapter_bytes == e  # same dtype: lorakit's fused path saves the shared input once, by reference
    n = 0
    # A LoRA adapter keeps x·Aᵀ (rows × r) for dB; on a cast path it also keeps its own cast copy of x.
    for a in adapted.values():
        n += T * a.rank * step.adapter_bytes + (0 if fused else T * a.in_features * step.adapter_bytes)
        if a.leaf not in KNOWN_LEAVES and fused:
            n += T * a.in_features * e  # an input this formula does not know to be shared: counted on its own
    keeps_input = (lambda leaves: step.full or (fused and any(x in adapted for x in leaves)))

    if grad_in:  # input_layernorm: its fp32 input and 1/rms; full FT also the normalised value for the weight's grad
        n += T * h * F32 + T * F32 + (T * h * e if step.full else 0)
    if keeps_input(ATTN_INPUT):
        n += T * h * e  # the normalised input of q/k/v, kept for their weight (or A) gradients
    attn_grad = step.full or grad_in or any(x in adapted for x in ATTN_INPUT)
    if attn_grad:  # SDPA (flash kernels) keeps q and k after rotary, v, its output (= o_proj's input) and the log-sum-exp
        n += T * (2 * q_dim + 2 * kv_dim) * e + step.batch * s.heads * step.seq * F32
    elif "o_proj" in adapted and fused:
        n += T * q_dim * e  # o_proj's adapter alone keeps the attention output
    mid_grad = attn_grad or "o_proj" in adapted
    if mid_grad:  # post_attention_layernorm
        n += T * h * F32 + T * F32 + (T * h * e if step.full else 0)
    if keeps_input(MLP_INPUT):
        n += T * h * e
    gate_grad, up_grad = mid_grad or "gate_proj" in adapted, mid_grad or "up_proj" in adapted
    # SiLU keeps its input, and SiLU(gate)·up keeps each factor for the other's gradient.
    n += T * i * e * (2 * int(gate_grad) + int(up_grad))
    if keeps_input(("down_proj",)):
        n += T * i * e
    return n, mid_grad or gate_grad or up_grad or "down_proj" in adapted


def head_saved(s: Shape, step: Step, checkpointing: bool) -> tuple[int, int]:
    """(bytes the final norm, output head and loss keep, of which the fp32 log-softmax)."""
    T, e, h = step.tokens, step.act_bytes, s.hidden
    log_softmax = T * s.vocab * F32  # transformers upcasts the logits to fp32 for the loss
    n = T * h * F32 + T * F32 + log_softmax + T * 8 + F32  # final norm input, 1/rms, log-softmax, int64 labels, a scalar
    if step.full:
        n += 2 * T * h * e + T * 8  # normalised value (norm weight grad), head input (head weight grad), input ids
    if not checkpointing:  # checkpointed blocks recompute what they need from cos/sin; unchecked ones save them
        n += 2 * step.seq * s.head_dim * e  # rotary cos/sin, shared by every block
    return n, log_softmax


def activation_memory(s: Shape, step: Step, adapted: list[Adapted], checkpointing: bool = False) -> Activations:
    """Saved activations and their peak (plus the loss's and a block's backward buffers) for one step."""
    by_block: dict[int, dict[str, Adapted]] = {}
    for a in adapted:
        if a.block is not None:
            by_block.setdefault(a.block, {})[a.leaf] = a
    grad = step.full  # full FT trains the embedding, so even block 0's input needs a gradient
    blocks, checkpoints = [], 0
    for b in range(s.layers):
        mine = by_block.get(b, {})
        if grad or mine:
            checkpoints += step.tokens * s.hidden * step.act_bytes  # a checkpointed block keeps only its input
        n, grad = block_saved(s, step, mine, grad)
        blocks.append(n)
    head, log_softmax = head_saved(s, step, checkpointing) if grad else (0, 0)
    for a in adapted:  # outside the blocks (an adapted output head or embedding): its input and x·Aᵀ
        if a.block is None:
            head += step.tokens * (a.in_features * step.act_bytes + a.rank * step.adapter_bytes)
    T, e = step.tokens, step.act_bytes
    # Loss backward holds the log-softmax, its gradient and the logits' gradient (all fp32) at once.
    loss_tmp = 2 * T * s.vocab * F32 if grad else 0
    # A block's backward: gradients of the MLP's three wide tensors and of two hidden-sized ones.
    block_tmp = T * (3 * s.intermediate + 2 * s.hidden) * e
    largest = max(blocks, default=0)
    if checkpointing:
        saved = checkpoints + head
        peak = max(saved + loss_tmp, saved - log_softmax + largest + block_tmp)
    else:
        saved = sum(blocks) + head
        peak = max(saved + loss_tmp, saved - log_softmax + block_tmp)
    return Activations(saved, peak, largest)
