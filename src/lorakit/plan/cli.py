"""`lorakit plan`: argument parsing for the memory planner; the work is `plan_memory`."""

from __future__ import annotations

from .planner import METHODS, plan_memory
from .storage import OPTIMIZERS


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory of full FT / LoRA / QLoRA training and of serving, from a config alone",
                       description="Plan training and serving memory from a model's config.json (built on the meta "
                                   "device: no weights are read).")
    p.add_argument("--model", required=True, help="model directory, its config.json, or builtin (lorakit's built-in model)")
    p.add_argument("--method", default="all", choices=METHODS + ("all",))
    p.add_argument("--rank", "-r", type=int, default=8)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", nargs="+", help="module names, a regex, or all-linear (default: per model family)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--optim", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--serve-adapters", type=int, default=10, help="N for one base + N adapters vs N merged copies")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="model dtype (default: the config's, else fp32)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where training would run")
    p.set_defaults(func=run)


def run(args) -> int:
    targets = args.targets
    if targets is not None and len(targets) == 1:
        targets = targets[0]  # "all-linear" or a regex
    plan = plan_memory(args.model, method=args.method, rank=args.rank, alpha=args.alpha, targets=targets,
                       batch=args.batch, seq=args.seq, gradient_checkpointing=args.grad_checkpointing, optim=args.optim,
                       serve_adapters=args.serve_adapters, dtype=args.dtype, device=args.device)
    print(plan.format())
    return 0
