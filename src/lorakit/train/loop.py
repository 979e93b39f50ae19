"""The training loop of `lorakit train`: AdamW on the adapter (or, with --method full, every weight), warmup +
decay, accumulation, clipping, checkpoints every N steps, resume, evaluation, and the evidence at the end
(metrics with step time and peak memory, plot, diagnostics)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import trainable_parameters
from ..errors import ConfigError
from ..files import atomic_write_json, atomic_write_text
from ..hf import load_base_model, load_tokenizer
from ..inspect import effective_rank
from ..inject import lora_layers
from . import data as data_mod
from .checkpoint import Progress, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .diagnostics import diagnose
from .distributed import World, close_world, init_world
from .evaluate import evaluate
from .loss import loss_fn
from .measure import cost_line, peak_memory, step_times
from .methods import ADAPTER, method_for
from .plot import plot_losses


@dataclass
class TrainResult:
    out: Path
    progress: Progress
    metrics: dict
    diagnostics: list[str]
    seconds: float
    model: nn.Module | None = None  # the adapted model, adapter "default" active


def train(config: TrainConfig, world: World | None = None) -> TrainResult:
    own_world = world is None
    world = world or init_world()
    try:
        return _train(config, world)
    finally:
        if own_world:
            close_world(world)


def _train(config: TrainConfig, world: World) -> TrainResult:
    t_start = time.perf_counter()
    out = Path(config.out)
    _check_out_dir(out, config.resume)
    _seed_everything(config.seed)
    say = print if world.is_main else (lambda *a, **k: None)

    tokenizer = load_tokenizer(config.base)
    train_set, eval_set = _load_data(config, tokenizer)
    model = _load_model(config, train_set.label_names, world)
    method = method_for(config)
    method.prepare(model, config)
    count = trainable_parameters(model, verbose=world.is_main)
    if count.trainable == 0:
        raise ConfigError("no parameter is trainable after injection; check --targets")

    pad_id = tokenizer.pad_token_id
    before = None
    if config.compare_base and world.is_main:
        say(f"evaluating the base model on {len(eval_set)} held-out examples ...")
        with method.base_model(model), torch.random.fork_rng():
            before = evaluate(model, eval_set, config.task, pad_id, tokenizer=tokenizer, exact_match=config.exact_match)
        say("base: " + _fmt(before))

    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    progress = Progress()
    if config.resume and list_checkpoints(out):
        last = list_checkpoints(out)[-1]
        progress = load_checkpoint(last, model, ADAPTER, optimizer, scheduler, method.restore, method.weights_file)
        say(f"resumed from {last} (step {progress.step})")
    elif config.resume:
        say(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")

    run_model = model
    if world.size > 1:
        run_model = nn.parallel.DistributedDataParallel(model)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # a KV cache is useless while training and costs memory
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        _loop(config, world, model, run_model, optimizer, scheduler, progress, train_set, eval_set, pad_id, tokenizer, out)
    finally:
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.config.use_cache = use_cache
        model.eval()

    metrics = {}
    if world.is_main:
        with torch.random.fork_rng():
            metrics = evaluate(model, eval_set, config.task, pad_id, tokenizer=tokenizer, exact_match=config.exact_match)
        result = _finish(config, out, model, progress, metrics, before, count, t_start, say, tokenizer)
    else:
        result = TrainResult(out, progress, metrics, [], time.perf_counter() - t_start)
    world.barrier()
    result.model = model
    return result


def _loop(config, world, model, run_model, optimizer, scheduler, progress, train_set, eval_set, pad_id, tokenizer, out):
    from tqdm.auto import tqdm

    compute_loss = loss_fn(config.task)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=config.max_steps, initial=progress.step, disable=not world.is_main, desc="train",
               dynamic_ncols=True, mininterval=1.0)
    rows_per_micro = config.batch_size * world.size
    if len(train_set) < rows_per_micro:
        raise ConfigError(f"the training split has {len(train_set)} rows, fewer than one batch "
                          f"({config.batch_size} x {world.size} processes); lower --batch-size")
    autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    while progress.step < config.max_steps:
        t0, cpu0 = time.perf_counter(), time.process_time()
        micro = [_next_micro_batch(progress, train_set, config, world, rows_per_micro) for _ in range(config.grad_accum)]
        local = [data_mod.collate(rows, pad_id) for rows in micro]
        counts = [_target_count(b, config.task) for b in local]
        global_count = world.sum(sum(counts))
        loss_total = 0.0
        for i, batch in enumerate(local):
            sync = i == len(local) - 1 or world.size == 1
            ctx = run_model.no_sync() if not sync and world.size > 1 else contextlib.nullcontext()
            with ctx, autocast:
                loss_sum, _ = compute_loss(run_model if world.size > 1 else model, batch)
            # Divide by the count over the whole step (all micro-batches, all processes), so accumulation
            # and data parallelism give the gradient one big batch would; DDP averages, so undo its 1/size.
            with ctx:
                (loss_sum * (world.size / max(global_count, 1))).backward()
            loss_total += float(loss_sum.detach())
        loss_value = world.sum(loss_total) / max(global_count, 1)
        grad_norm = _clip(params, config.max_grad_norm)
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            last = list_checkpoints(out)
            progress.stopped_reason = (
                f"Loss or gradient became {'NaN' if math.isnan(loss_value) or math.isnan(grad_norm) else 'infinite'} "
                f"at step {progress.step + 1}; training stopped before applying it. The adapter from step "
                f"{progress.step} is kept" + (f" (last checkpoint: {last[-1]})" if last else "")
                + ". Lower --lr, use --precision fp32, or check the data."
            )
            bar.write(progress.stopped_reason) if world.is_main else None
            break
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        tokens = world.sum(sum(int(b["attention_mask"].sum()) for b in local))
        progress.tokens += int(tokens)
        progress.step_seconds.append(time.perf_counter() - t0)
        progress.step_cpu_seconds.append(time.process_time() - cpu0)
        progress.train_seconds += progress.step_seconds[-1]
        progress.train_loss.append((progress.step, loss_value))
        progress.grad_norm.append((progress.step, grad_norm))
        bar.update(1)
        if progress.step % config.log_every == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if config.eval_every and progress.step % config.eval_every == 0 and progress.step < config.max_steps:
            _evaluate_during(config, world, model, eval_set, pad_id, tokenizer, progress, out, bar)
        if config.save_every and progress.step % config.save_every == 0 and world.is_main:
            save_checkpoint(out, model, optimizer, scheduler, progress, config.keep_checkpoints, method_for(config).save)
        if config.save_every and progress.step % config.save_every == 0:
            world.barrier()
    bar.close()


def _next_micro_batch(progress: Progress, dataset, config: TrainConfig, world: World, rows_per_micro: int):
    """This process's rows of the next micro-batch; an epoch ends when a full micro-batch no longer fits."""
    n = len(dataset)
    if (progress.batch_in_epoch + 1) * rows_per_micro > n:
        progress.epoch += 1
        progress.batch_in_epoch = 0
    order = data_mod.epoch_order(n, config.seed, progress.epoch)
    start = progress.batch_in_epoch * rows_per_micro + world.rank * config.batch_size
    progress.batch_in_epoch += 1
    return [dataset.examples[i] for i in order[start:start + config.batch_size]]


def _target_count(batch, task: str) -> int:
    if task == "causal-lm":
        return int((batch["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum())
    return int(batch["labels"].numel())


def _clip(params, max_norm: float | None) -> float:
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def _evaluate_during(config, world, model, eval_set, pad_id, tokenizer, progress, out, bar):
    if not world.is_main:
        return
    with torch.random.fork_rng():  # evaluation must not shift the training run's random stream
        metrics = evaluate(model, eval_set, config.task, pad_id, tokenizer=tokenizer, exact_match=False)
    metrics["step"] = progress.step
    progress.eval_metrics.append(metrics)
    if progress.best_eval_loss is None or metrics["eval_loss"] < progress.best_eval_loss:
        progress.best_eval_loss, progress.best_step = metrics["eval_loss"], progress.step
        method_for(config).save(model, out / "best", tokenizer)
    bar.write(f"step {progress.step}: " + _fmt(metrics))


def _finish(config, out, model, progress, metrics, before, count, t_start, say, tokenizer=None) -> TrainResult:
    metrics = {**metrics, "step": progress.step}
    progress.eval_metrics.append(metrics)
    method = method_for(config)
    if progress.best_eval_loss is None or metrics["eval_loss"] <= progress.best_eval_loss:
        progress.best_eval_loss, progress.best_step = metrics["eval_loss"], progress.step
        method.save(model, out / "best", tokenizer)
    method.save(model, out, tokenizer)
    usage = []
    for _, layer in lora_layers(model):
        a = layer.adapters[ADAPTER]
        delta = a.lora_B.detach().float().flatten(1) @ a.lora_A.detach().float().flatten(1)
        usage.append((effective_rank(delta), a.rank))
    notes = diagnose(progress, count.trainable, count.total, usage, method=config.method)
    seconds = time.perf_counter() - t_start
    summary = {
        "config": config.to_dict(),
        "final": metrics,
        "base": before,
        "best_step": progress.best_step,
        "steps": progress.step,
        "tokens": progress.tokens,
        "train_tokens_per_second": round(progress.tokens / max(progress.train_seconds, 1e-9), 1),
        "seconds": round(seconds, 1),
        "method": config.method,
        "trainable_params": count.trainable,
        "total_params": count.total,
        **step_times(progress.step_seconds, progress.step_cpu_seconds),
        **peak_memory(next(model.parameters()).device),
        "train_loss": progress.train_loss,
        "grad_norm": progress.grad_norm,
        "eval": progress.eval_metrics,
        "diagnostics": notes,
        "stopped_reason": progress.stopped_reason,
    }
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_json(out / "train_config.json", config.to_dict())
    atomic_write_text(out / "diagnostics.txt", "\n".join(notes) + ("\n" if notes else "no problems found\n"))
    plot = plot_losses(progress, out / "loss.png")
    say("final: " + _fmt(metrics))
    say(cost_line(summary))
    if before is not None:
        say(_comparison(before, metrics))
    for note in notes:
        say("diagnostic: " + note)
    what = "model" if config.method == "full" else "adapter"
    say(f"{what}, metrics.json{', loss.png' if plot else ''} and checkpoints in {out} ({seconds:.0f}s)")
    return TrainResult(out, progress, metrics, notes, seconds)


def _comparison(before: dict, after: dict) -> str:
    rows = ["", f"{'held-out metric':<16}{'base':>10}{'adapted':>10}"]
    for key in ("exact_match", "accuracy", "f1_macro", "eval_loss", "perplexity"):
        if key in before and key in after:
            rows.append(f"{key:<16}{before[key]:>10.4g}{after[key]:>10.4g}")
    return "\n".join(rows)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _check_out_dir(out: Path, resume: bool) -> None:
    if not resume and list_checkpoints(out):
        raise ConfigError(f"{out} already holds a run ({list_checkpoints(out)[-1].name}); pass --resume to continue "
                          "it, or choose another --out (nothing was overwritten)")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_data(config: TrainConfig, tokenizer):
    if config.task == "causal-lm":
        ds = data_mod.load_causal_lm(config.data, tokenizer, config.max_length)
    else:
        ds = data_mod.load_classification(config.data, tokenizer, config.max_length)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    train_set, eval_set = data_mod.split(ds, config.eval_fraction, split_seed, config.max_eval)
    if config.packing and config.task == "causal-lm":
        train_set.examples = data_mod.pack(train_set.examples, config.max_length)
    if not eval_set.examples:
        eval_set = data_mod.Dataset(train_set.examples[: min(len(train_set), 32)], train_set.label_names, ds.path)
    return train_set, eval_set


def _load_model(config: TrainConfig, label_names: list[str], world: World) -> nn.Module:
    dtype = method_for(config).model_dtype(config)
    if config.task == "classify":
        model = load_base_model(config.base, "SEQ_CLS", dtype=dtype, num_labels=len(label_names),
                                id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    else:
        model = load_base_model(config.base, "CAUSAL_LM", dtype=dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = load_tokenizer(config.base).pad_token_id
    return model.to(world.device)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; with LoRA+ the B factors learn `lora_plus_ratio` times faster."""
    base_lr, fast = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if config.lora_plus_ratio and name.endswith("lora_B") else base_lr).append(p)
    groups = [{"params": base_lr, "lr": config.lr}]
    if fast:
        groups.append({"params": fast, "lr": config.lr * config.lora_plus_ratio})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _schedule(config: TrainConfig):
    warmup, total = config.warmup_steps, config.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor
