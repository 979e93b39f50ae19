"""The fast path of a plain LoRA layer: `base(x) + scale·(x Aᵀ) Bᵀ` for Linear and GPT-2 Conv1D, with a
hand-written backward for the frozen weight, and the rule that folds `scale·B·A` into the weight for long batches.

Kept apart from layers.py because it is an optimisation: layers.py states the math, this file makes it fast.
Variants whose update is low-rank (AdaLoRA) reuse it by passing their effective factors as A and B; DoRA also
passes its per-output-feature factor g: `g ⊙ (x Wᵀ + scale·(x Aᵀ) Bᵀ) + bias`. VeRA reuses the folding rule with
its own backward (variants/vera.py): the gradient it needs is two vectors, not two matrices. A quantised base (quant/) passes its weight as a function that dequantises it: called in forward and again in
backward, so no layer keeps a full-precision copy of its weight between the two (that would undo the quantisation).
"""

from __future__ import annotations

import torch

# Folding `scale·B·A` into a temporary copy of the weight costs out·in·r multiply-adds plus a few
# memory-bound passes over the weight; adding the low-rank term row by row costs rows·r·cols. This
# constant prices those passes in multiply-adds per weight element (fitted on a 2-core EPYC, fp32:
# the measured break-even lies within ~10% of the rule below for 512/1376-wide layers).
_FOLD_PASSES = 4


def _fold_is_cheaper(rows: int, cols: int, weight: torch.Tensor, r: int) -> bool:
    """Whether adding the low-rank term to `rows` rows of width `cols` costs more than folding it into the weight.

    Long batches (a training step, a prefill) have more rows than the weight has columns, so folding
    wins there; decoding a few tokens keeps the row-wise product. Folding only happens when the
    temporary weight is smaller than the rows × cols activations the row-wise product would touch, so
    it adds less memory than that, one layer at a time. Only fp32/fp64: folding a small delta into a
    bf16/fp16 weight would round most of it away.
    """
    return weight.dtype in (torch.float32, torch.float64) and rows * cols * r > weight.numel() * (r + _FOLD_PASSES)


def _folded_weight(weight, lora_A, lora_B, scale, transposed, owned=False):
    """`weight + scale·B·A` in the base weight's own layout, so using it is the base layer's own op.

    With B = 0 this is the base weight bit for bit (adding exact zeros), so the output stays bit-exact.
    An `owned` weight (a dequantised temporary) is folded in place: no second weight-sized tensor.
    """
    a, b = (lora_A.T, lora_B.T) if transposed else (lora_B, lora_A)  # Conv1D stores (in, out)
    return weight.addmm_(a, b, alpha=scale) if owned else torch.addmm(weight, a, b, alpha=scale)


def _base_op(x2, weight, bias, transposed):
    """Exactly the op nn.Linear / Conv1D run on a 2-D input, so that B = 0 gives the base output bit for bit."""
    w_t = weight if transposed else weight.T  # (in, out)
    return torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t


def _scale_features_(w, g, transposed):
    """Multiply each output feature's weights by g in place (rows of (out, in); columns of Conv1D's (in, out))."""
    return w.mul_(g if transposed else g[:, None])


def _materialise(weight):
    """(the weight tensor, whether it is a temporary of ours): a quantised base passes a function that dequantises."""
    return (weight(), True) if callable(weight) else (weight, False)


def _lora_linear_forward(x2, weight, bias, lora_A, lora_B, scale, transposed, keep_t, g=None):
    """`base(x2) + scale·(x2 Aᵀ) Bᵀ` on 2-D rows (times g per feature before the bias, when given); returns it
    and `t = x2 Aᵀ` (computed only if `keep_t`)."""
    weight, owned = _materialise(weight)
    rows, in_f = x2.shape
    out_f = weight.numel() // in_f
    t = x2 @ lora_A.T if keep_t else None  # backward needs t for dB; inference does not
    # Row-wise, the LoRA term costs an (rows, out) product, plus (rows, in) for t when t is not kept anyway.
    if _fold_is_cheaper(rows, out_f if keep_t else in_f + out_f, weight, lora_A.shape[0]):
        w = _folded_weight(weight, lora_A, lora_B, scale, transposed, owned)
        return _base_op(x2, w if g is None else _scale_features_(w, g, transposed), bias, transposed), t
    y = _base_op(x2, weight, bias if g is None else None, transposed)
    # addmm_ adds the low-rank term into y in place: no second output-sized tensor, no separate scaling pass.
    y.addmm_(t if t is not None else x2 @ lora_A.T, lora_B.T, alpha=scale)
    if g is not None:
        y.mul_(g)
        if bias is not None:
            y.add_(bias)
    return y, t


class _LoraLinearFn(torch.autograd.Function):
    """`base(x) + scale·(x Aᵀ) Bᵀ` with a hand-written backward for a frozen weight.

    Why: autograd would add the LoRA branch's input gradient to the base's in a separate pass and
    scale the output-sized tensor; here both gradients land in one buffer (through `addmm_`, or through
    a folded weight for long batches), and only r-sized tensors are scaled.

    With DoRA's factor g the output is `g ⊙ z + bias`, z the above without bias. g's gradient needs z,
    which is kept; the gradient through z, `g ⊙ dy`, is never formed: g goes into the r-wide tensors and
    into the folded weight instead (out·in numbers, not rows·out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, transposed, g=None):
        x2 = x.reshape(-1, x.shape[-1])
        z = None
        if g is not None and ctx.needs_input_grad[7]:
            z, t = _lora_linear_forward(x2, weight, None, lora_A, lora_B, scale, transposed, keep_t=True)
            y = torch.addcmul(bias, z, g) if bias is not None else z * g
        else:
            y, t = _lora_linear_forward(x2, weight, bias, lora_A, lora_B, scale, transposed, keep_t=True, g=g)
        # x is needed for dA; t (rows × r, r/in of x's size) is kept so backward need not recompute x·Aᵀ.
        # A weight given as a function is not kept: backward materialises it again.
        ctx.weight_fn = weight if callable(weight) else None
        ctx.save_for_backward(x2, None if callable(weight) else weight, lora_A, lora_B, t, g, z)
        ctx.scale, ctx.transposed, ctx.has_bias = scale, transposed, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, t, g, z = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        rows, in_f = x2.shape
        need_dx, need_dA = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        owned = False
        if need_dx and ctx.weight_fn is not None:
            weight, owned = _materialise(ctx.weight_fn)
        # dx = dy·(W + scale·B·A): fold the weight for long batches, else add g·A (rows·in·r) into dy·W.
        fold_dx = need_dx and _fold_is_cheaper(rows, in_f, weight, lora_A.shape[0])
        B_g = lora_B if g is None else lora_B * g[:, None]  # (g ⊙ dy)·B = dy·(g ⊙ B)
        gr = None
        if need_dA or (need_dx and not fold_dx):
            gr = (dy2 @ B_g).mul_(ctx.scale)  # gradient at the rank-r bottleneck
        dx = d_bias = dA = dB = dg = None
        if need_dx:
            if fold_dx:
                w = _folded_weight(weight, lora_A, lora_B, ctx.scale, ctx.transposed, owned)
                if g is not None:
                    _scale_features_(w, g, ctx.transposed)
                dx = dy2 @ (w.T if ctx.transposed else w)
            else:
                dx = (dy2 if g is None else dy2 * g) @ (weight.T if ctx.transposed else weight)
                dx.addmm_(gr, lora_A)
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = dy2.sum(0)
        if need_dA:
            dA = gr.T @ x2
        if ctx.needs_input_grad[4]:
            # tᵀ·dy, transposed: the same numbers as dyᵀ·t, but BLAS runs this orientation ~1.9x faster on CPU
            # (bench/core.py; a (rows × out)ᵀ·(rows × r) product is the slow case).
            dB = (t.T @ dy2).T.mul_(ctx.scale)
            if g is not None:
                dB.mul_(g[:, None])
        if z is not None:
            dg = (dy2 * z).sum(0)
        return dx, None, d_bias, dA, dB, None, None, dg


def fused_linear(x, weight, bias, lora_A, lora_B, scale, transposed, g=None):
    """The fused path: through the autograd Function when a gradient is wanted, else forward only.

    Inference skips the Function because it would compute and keep `t = x·Aᵀ` for a backward that never
    comes, and without t the folded weight pays off for even shorter batches.
    `g` (out,), DoRA's factor, rescales each output feature before the bias is added. `weight` may be a
    function that returns it (a quantised base dequantising on demand).
    """
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, bias, lora_A, lora_B, g)):
        return _LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, scale, transposed, g)
    y, _ = _lora_linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scale, transposed,
                                keep_t=False, g=g)
    return y.view(*x.shape[:-1], y.shape[-1])
