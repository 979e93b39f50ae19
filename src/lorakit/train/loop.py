"""The training loop of `lorakit train`: AdamW on the adapter (or, with --method full, every weight), warmup +
decay, accumulation, clipping, checkpoints every N steps, resume, evaluation, and the evidence at the end
(metrics with step time and peak memory, plot, diagnostics)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import trainable_parameters
from ..device import check_bf16, describe, model_device, to_device
from ..config import check_dropout_for_data
from ..errors import ConfigError
from ..files import atomic_write_json, atomic_write_text
from ..hf import BUILTIN, load_base_model, load_tokenizer, resolve_base
from ..inspect import effective_rank
from ..state import adapter_layers, get_state
from . import data as data_mod
from .builtin import model_path
from .checkpoint import Progress, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .diagnostics import diagnose
from .distributed import World, close_world, init_world
from .evaluate import evaluate
from .loss import loss_fn
from .measure import cost_line, peak_memory, step_times
from .methods import ADAPTER, method_for
from .optimizers import build_optimizer
from .plot import plot_losses
from .run_dir import check_out_dir, check_resume_step, remove_run, written


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
    world = world or init_world(config.device)
    try:
        return _train(config, world)
    finally:
        if own_world:
            close_world(world)


def _train(config: TrainConfig, world: World) -> TrainResult:
    t_start = time.perf_counter()
    config = _resolve_paths(config)  # before anything loads: a wrong --base or --data fails here, by name
    out = Path(config.out)
    check_out_dir(out, config.resume, config.overwrite)
    _seed_everything(config.seed)
    say = print if world.is_main else (lambda *a, **k: None)
    if config.precision == "bf16":
        check_bf16(world.device)
    say(f"device: {describe(world.device)}" + (f" (one of {world.size} processes)" if world.size > 1 else ""))

    tokenizer = load_tokenizer(config.base)
    train_set, eval_set, skipped = _load_data(config, tokenizer, say)
    config = _steps_from_epochs(config, len(train_set), world, say)
    if world.is_main and config.method != "full":
        check_dropout_for_data(config.dropout, len(train_set))
    if config.resume:
        check_resume_step(out, config.max_steps)
    model = _load_model(config, train_set.label_names, world)
    method = method_for(config)
    method.prepare(model, config)
    state = get_state(model)
    if state is not None and ADAPTER in state.configs:  # an adapter trains: say which modules it adapts
        defaults = config.targets is None
        config = dataclasses.replace(config, targets=state.configs[ADAPTER].target_modules)
        say(_describe_targets(state.targets[ADAPTER], config, defaults))
    count = trainable_parameters(model, verbose=world.is_main)
    if count.trainable == 0:
        raise ConfigError("no parameter is trainable after injection; check --targets")
    if world.is_main:
        if config.overwrite:
            remove_run(out)  # only now: a run that fails to start leaves the old one as it was
        # Written first, so that `--resume` finds the run's settings even if it is killed before the end.
        atomic_write_json(out / "train_config.json", {**config.to_dict(), "resume": False, "overwrite": False,
                                                      "adapted_modules": state.targets.get(ADAPTER) if state else None})
    world.barrier()

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
    if config.resume:  # check_out_dir made sure there is a checkpoint
        last = list_checkpoints(out)[-1]
        progress = load_checkpoint(last, model, ADAPTER, optimizer, scheduler, method.restore, method.weights_file)
        say(f"resumed from {last} (step {progress.step})")

    run_model = model
    if world.size > 1:
        run_model = nn.parallel.DistributedDataParallel(model)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # a KV cache is useless while training and costs memory
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers 5 also makes the embeddings' output require grad, which only reentrant checkpointing needs:
        # it would run backward through every frozen block below the adapters (2x the step on the demo).
        if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
            model.disable_input_require_grads()
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
        result = _finish(config, out, model, progress, metrics, before, count, t_start, say, tokenizer, skipped)
        say(f"base model: {config.base}" + (f" (--base {BUILTIN})" if Path(config.base) == model_path() else ""))
    else:
        result = TrainResult(out, progress, metrics, [], time.perf_counter() - t_start)
    world.barrier()
    result.model = model
    return result


def _loop(config, world, model, run_model, optimizer, scheduler, progress, train_set, eval_set, pad_id, tokenizer, out):
    from tqdm.auto import tqdm

    compute_loss = loss_fn(config.task)
    method = method_for(config)
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
        local = [to_device(data_mod.collate(rows, pad_id), world.device) for rows in micro]
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
                loss = loss_sum * (world.size / max(global_count, 1))
                extra = method.extra_loss(model)  # once per step in all: a share per micro-batch
                (loss if extra is None else loss + extra / len(local)).backward()
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
        method.after_step(model, progress.step + 1)
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
            save_checkpoint(out, model, optimizer, scheduler, progress, config.keep_checkpoints,
                            method.save_checkpoint_weights)
        if config.save_every and progress.step % config.save_every == 0:
            world.barrier()
    bar.close()
    # Always end with a checkpoint, so a finished run can be continued (--resume with a larger --max-steps).
    saved = {p.name for p in list_checkpoints(out)} if world.is_main else set()
    if world.is_main and progress.step > 0 and f"step-{progress.step:06d}" not in saved:
        save_checkpoint(out, model, optimizer, scheduler, progress, config.keep_checkpoints, method.save_checkpoint_weights)
    world.barrier()


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


def _finish(config, out, model, progress, metrics, before, count, t_start, say, tokenizer=None, skipped=()) -> TrainResult:
    metrics = {**metrics, "step": progress.step}
    progress.eval_metrics.append(metrics)
    method = method_for(config)
    if progress.best_eval_loss is None or metrics["eval_loss"] <= progress.best_eval_loss:
        progress.best_eval_loss, progress.best_step = metrics["eval_loss"], progress.step
        method.save(model, out / "best", tokenizer)
    method.save(model, out, tokenizer)
    with torch.no_grad():
        usage = [(effective_rank(_product(a)), a.rank) for _, _, a in adapter_layers(model, ADAPTER) if a.method != "mixture"]
    notes = diagnose(progress, count.trainable, count.total, usage, method=config.method)
    if skipped:
        shown, more = skipped[:data_mod.SHOWN_BAD_ROWS], len(skipped) - data_mod.SHOWN_BAD_ROWS
        notes.insert(0, f"Skipped {len(skipped)} bad data row(s) (--skip-bad-rows): " + "; ".join(shown)
                     + (f"; ... and {more} more (all in metrics.json)" if more > 0 else ""))
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
        "device": describe(model_device(model)),
        **peak_memory(model_device(model)),
        "train_loss": progress.train_loss,
        "grad_norm": progress.grad_norm,
        "eval": progress.eval_metrics,
        "diagnostics": notes,
        "stopped_reason": progress.stopped_reason,
        "skipped_rows": {"count": len(skipped), "rows": list(skipped)},
    }
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_text(out / "diagnostics.txt", "\n".join(notes) + ("\n" if notes else "no problems found\n"))
    plot = plot_losses(progress, out / "loss.png")
    say("final: " + _fmt(metrics))
    say(cost_line(summary))
    if before is not None:
        say(_comparison(before, metrics))
    for note in notes:
        say("diagnostic: " + note)
    say(written(out, progress.best_step, plot is not None, seconds, method.output_name))
    return TrainResult(out, progress, metrics, notes, seconds)


def _product(adapter) -> torch.Tensor:
    """B·A of an adapter's (effective) factors: the update whose rank use the diagnostics report."""
    A, B = adapter.factors()
    return B.detach().float().flatten(1) @ A.detach().float().flatten(1)


def _comparison(before: dict, after: dict) -> str:
    rows = ["", f"{'held-out metric':<16}{'base':>10}{'adapted':>10}"]
    for key in ("exact_match", "accuracy", "f1_macro", "eval_loss", "perplexity"):
        if key in before and key in after:
            rows.append(f"{key:<16}{before[key]:>10.4g}{after[key]:>10.4g}")
    return "\n".join(rows)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _resolve_paths(config: TrainConfig) -> TrainConfig:
    """The base checked (`builtin` -> its directory) and data paths made absolute, as train_config.json records them."""
    base = resolve_base(config.base or BUILTIN, tokenizer=True)
    paths = {k: str(Path(getattr(config, k)).absolute()) for k in ("data", "eval_data") if getattr(config, k)}
    return dataclasses.replace(config, base=str(base.absolute()), **paths)


def _steps_from_epochs(config: TrainConfig, rows: int, world: World, say) -> TrainConfig:
    """--epochs N: the optimizer steps that N passes over the training rows take (a partial last batch is dropped)."""
    if config.epochs is None:
        return config
    per_step = config.batch_size * world.size * config.grad_accum
    steps = max(1, math.ceil(config.epochs * (rows // (config.batch_size * world.size)) / config.grad_accum))
    say(f"--epochs {config.epochs:g}: {steps} optimizer steps ({rows} training rows, {per_step} per step)")
    return dataclasses.replace(config, max_steps=steps)


def _describe_targets(adapted: list[str], config: TrainConfig, defaulted: bool) -> str:
    """One line: the targets asked for (or defaulted), and the modules they became, by name and block."""
    counts: dict[str, int] = {}
    for name in adapted:
        leaf = name.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    modules = ", ".join(f"{leaf} x{n}" for leaf, n in counts.items())
    blocks = sorted({int(m.group(1)) for name in adapted if (m := re.search(r"\.(\d+)\.", name))})
    where = f" in blocks {_ranges(blocks)}" if blocks else ""
    targets = config.targets if isinstance(config.targets, str) else ", ".join(config.targets)
    why = " (this model family's default; choose with --targets)" if defaulted else ""
    return f"LoRA targets: {targets}{why} -> {len(adapted)} modules{where}: {modules}"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_data(config: TrainConfig, tokenizer, say):
    """Train and eval splits, and the bad rows skipped (`file:line: problem`; any is an error without --skip-bad-rows)."""
    def load(path, label_names=None):
        if config.task == "causal-lm":
            return data_mod.load_causal_lm(path, tokenizer, config.max_length, config.skip_bad_rows, config.chat_template)
        return data_mod.load_classification(path, tokenizer, config.max_length, label_names, config.skip_bad_rows)

    ds = load(config.data)
    loaded = [ds]
    if config.eval_data:
        train_set, eval_set = ds, load(config.eval_data, ds.label_names or None)
        loaded.append(eval_set)
        if config.max_eval is not None and len(eval_set) > config.max_eval:
            say(f"evaluating on the first {config.max_eval} of {len(eval_set)} rows of {config.eval_data} (--max-eval)")
            eval_set.examples = eval_set.examples[: config.max_eval]
    else:
        split_seed = config.seed if config.split_seed is None else config.split_seed
        train_set, eval_set = data_mod.split(ds, config.eval_fraction, split_seed, config.max_eval)
    if config.packing and config.task == "causal-lm":
        train_set.examples = data_mod.pack(train_set.examples, config.max_length)
    if not eval_set.examples:
        eval_set = data_mod.Dataset(train_set.examples[: min(len(train_set), 32)], train_set.label_names, ds.path)
    skipped = []
    for d in loaded:
        formats = ", ".join(f"{n} {kind}" for kind, n in d.formats.items())
        say(f"data: {d.path}: {formats} row(s)" + (f"; skipped {len(d.bad_rows)} bad row(s):" if d.bad_rows else ""))
        if d.bad_rows:
            say(data_mod.describe_bad_rows(d.path, d.bad_rows))
        skipped += [f"{d.path}:{n}: {p}" for n, p in d.bad_rows]
    say(f"{len(train_set)} training and {len(eval_set)} held-out examples")
    return train_set, eval_set, skipped


def _load_model(config: TrainConfig, label_names: list[str], world: World) -> nn.Module:
    dtype = method_for(config).model_dtype(config)
    # A quantised base is quantised where it will run (bitsandbytes quantises as it places the weights).
    quant = {"quantize": config.quantize, "device_map": {"": str(world.device)}} if config.quantize else {}
    if config.task == "classify":
        model = load_base_model(config.base, "SEQ_CLS", dtype=dtype, num_labels=len(label_names),
                                id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
                                **quant)
    else:
        model = load_base_model(config.base, "CAUSAL_LM", dtype=dtype, **quant)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = load_tokenizer(config.base).pad_token_id
    return model if config.quantize else model.to(world.device)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (--optim) over trainable parameters; with LoRA+ the B factors learn `lora_plus_ratio` times faster."""
    base_lr, fast = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if config.lora_plus_ratio and name.endswith("lora_B") else base_lr).append(p)
    groups = [{"params": base_lr, "lr": config.lr}]
    if fast:
        groups.append({"params": fast, "lr": config.lr * config.lora_plus_ratio})
    return build_optimizer(config.optim, groups, config.lr, config.weight_decay, next(model.parameters()).device)


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
