"""`lorakit generate`: text from a base model with an adapter (or a saved mixture of LoRAs), or one adapter per prompt
in one batch."""

from __future__ import annotations

import argparse
import os

import torch

from ..device import add_device_argument, add_threads_argument, resolve_device, to_device
from ..errors import ConfigError

BASE_WORDS = ("base", "none")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an adapter (or several, one per prompt)",
                       description="Generate text from a base model with an adapter, or with one adapter per prompt "
                                   "in a single batch (the way the server mixes adapters). Prompts are plain text, as "
                                   "in /v1/completions; with --chat each is a user message put through the chat "
                                   "template, as in /v1/chat/completions.")
    p.add_argument("--base", required=True, help="base model directory, or 'builtin'")
    p.add_argument("--adapter", action="append", default=[],
                   help="adapter directory or saved mixture of LoRAs; give one for all prompts, or one per prompt "
                        "('base' = no adapter)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p, "torch CPU threads for loading and generating (default: all cores; 1 is often faster "
                            "when other jobs share the CPU)")
    add_device_argument(p)
    p.set_defaults(func=run)


def generate(base: str, adapters: list[str | os.PathLike], prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False, device: str | torch.device = "auto") -> list[str]:
    from .. import load_adapter
    from ..chat import prompt_ids
    from ..compose.mixture import check_mixture_files, commit_mixture, is_mixture_dir, prepare_mixture
    from ..hf import load_base_model, load_tokenizer, resolve_base

    device = resolve_device(device)  # first: a GPU that is not there is said before anything loads
    if adapters and len(adapters) not in (1, len(prompts)):
        raise ConfigError(f"got {len(adapters)} --adapter values for {len(prompts)} prompts: give one adapter for all "
                          "prompts, or exactly one per prompt")
    adapters = [str(a) for a in adapters]  # paths or names, as str: "base" is a word, not a path
    base = resolve_base(base, tokenizer=True)
    real = [a for a in adapters if a.lower() not in BASE_WORDS]
    configs = [_first_config(a) for a in dict.fromkeys(real)]  # a bad adapter fails before the model loads
    tokenizer = load_tokenizer(base)
    if chat:  # the same tokens the server's /v1/chat/completions builds
        ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [tokenizer(p)["input_ids"] for p in prompts]
    model = load_base_model(base, (configs[0].task_type if configs else None) or "CAUSAL_LM").to(device).eval()
    names: dict[str, str] = {}
    for path in dict.fromkeys(real):
        names[path] = f"adapter{len(names)}"
        if is_mixture_dir(path):  # as the server loads one: its experts become `<name>/<expert>`, so two never clash
            commit_mixture(model, prepare_mixture(model, check_mixture_files(path, model), names[path]))
        else:
            load_adapter(model, path, adapter=names[path])
    tokenizer.padding_side = "left"
    batch = to_device(tokenizer.pad({"input_ids": ids}, return_tensors="pt"), device)
    torch.manual_seed(seed)  # seeds the GPU's generator too: sampled text depends on the seed and the device
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    if names:  # a plain model (only 'base' given) has no adapter_names argument
        rows = [None if a.lower() in BASE_WORDS else names[a]
                for a in (adapters * len(prompts) if len(adapters) == 1 else adapters)]
        kwargs["adapter_names"] = rows
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)


def _first_config(path: str):
    """The adapter's config, or a mixture's first expert's (each expert's config is read, so that a broken one is
    said before the model loads)."""
    from ..compose.mixture import is_mixture_dir, read_expert_configs
    from ..io import read_adapter_config

    if is_mixture_dir(path):
        return next(iter(read_expert_configs(path).values()))
    return read_adapter_config(path)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = generate(args.base, args.adapter, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                     chat=args.chat, device=args.device)
    for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
        label = args.adapter[i if len(args.adapter) > 1 else 0] if args.adapter else "base"
        print(f"--- [{label}] {prompt!r}\n{text}")
    return 0
