"""`lorakit generate`: text from a base model with an adapter, or one adapter per prompt in one batch."""

from __future__ import annotations

import argparse

import torch

from ..errors import ConfigError

BASE_WORDS = ("base", "none")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an adapter (or several, one per prompt)")
    p.add_argument("--base", required=True, help="base model directory")
    p.add_argument("--adapter", action="append", default=[],
                   help="adapter directory; give one for all prompts, or one per prompt ('base' = no adapter)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def generate(base: str, adapters: list[str], prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[str]:
    from .. import load_adapter, read_adapter_config
    from ..hf import load_base_model, load_tokenizer

    if adapters and len(adapters) not in (1, len(prompts)):
        raise ConfigError(f"got {len(adapters)} --adapter values for {len(prompts)} prompts: give one adapter for all "
                          "prompts, or exactly one per prompt")
    real = [a for a in adapters if a.lower() not in BASE_WORDS]
    task = read_adapter_config(real[0]).task_type if real else "CAUSAL_LM"
    model = load_base_model(base, task or "CAUSAL_LM").eval()
    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "left"
    names: dict[str, str] = {}
    for path in dict.fromkeys(real):
        names[path] = f"adapter{len(names)}"
        load_adapter(model, path, adapter=names[path])
    rows = [None if a.lower() in BASE_WORDS else names[a] for a in (adapters * len(prompts) if len(adapters) == 1 else adapters)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    if rows:
        kwargs["adapter_names"] = rows
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    texts = generate(args.base, args.adapter, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
        label = args.adapter[i if len(args.adapter) > 1 else 0] if args.adapter else "base"
        print(f"--- [{label}] {prompt!r}\n{text}")
    return 0
