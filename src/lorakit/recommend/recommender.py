"""`recommend_config`: a starting LoraConfig and training settings for a model, a task, a data size, a memory
budget and a priority, each setting with a reason that cites the study's measurement or the memory plan."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DEFAULT_TARGETS, LoraConfig
from ..errors import ConfigError
from ..files import atomic_write_text
from ..hf import BUILTIN
from ..plan.meta import load_config
from ..train.config import LORA_ONLY, TASKS, TrainConfig
from ..train.methods import LoraMethod
from .choices import (PRIORITIES, Setting, choose_alpha, choose_dropout, choose_layers, choose_length, choose_lr,
                      choose_method, choose_rank, choose_schedule, choose_targets, is_all_linear, measured, not_run,
                      reference, train_rows)
from .memory import HEADROOM, MemoryFit, cannot_fit, fit_memory, gib
from .study import Study

ATTENTION_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")  # q/k/v/o_proj names
STUDY_BATCH = 16  # prior for the effective batch when the study's default run has not finished


@dataclass
class Recommendation:
    """What `lorakit recommend` prints: the settings with their reasons, the LoraConfig (`config`, also `lora`),
    the memory plan, and `train_config()` / `command()` to run it with `lorakit train`."""

    model: str
    task: str
    priority: str
    examples: int | None
    memory_gb: float | None
    device: str
    settings: list[Setting]
    train: dict[str, Any]  # TrainConfig values (no --data / --out: the user's)
    lora: LoraConfig | None  # None for full fine-tuning
    memory: MemoryFit
    fits: bool
    memory_note: str | None  # the plain statement when even QLoRA cannot fit
    study: Study
    notes: list[str] = field(default_factory=list)
    bundled: bool = False  # planned for lorakit's bundled data (the built-in model with no examples given)

    @property
    def config(self) -> LoraConfig | None:
        """The starting LoraConfig, for `lorakit.inject(model, rec.config)` (the same object as `lora`; None when
        the recommendation is full fine-tuning)."""
        return self.lora

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def train_config(self) -> dict[str, Any]:
        """Settings for `lorakit train --config FILE` (add --data; flags given with it override the file)."""
        return dict(self.train)

    def command(self, data: str | None = None) -> str:
        """The `lorakit train` command line with these settings (DATA.jsonl / MODEL_DIR stand for what is not known)."""
        values = dict(self.train)
        base = values.pop("base", None)
        argv = ["lorakit", "train", "--base", base or "MODEL_DIR"]
        if data is not None or not self.bundled:  # the built-in model without --data trains on the bundled data
            argv += ["--data", data or "DATA.jsonl"]
        for key, value in values.items():
            flag = "--" + ("layers" if key == "layers_to_transform" else key.replace("_", "-"))
            if value is None or value is False:
                continue
            if value is True:
                argv.append(flag)
            elif isinstance(value, list):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return shlex.join(argv)

    def write(self, path: str | os.PathLike, data: str | None = None) -> Path:
        """Write train_config() (and `data`, as an absolute path) as JSON (.json) or YAML (.yaml/.yml), for
        `lorakit train --config`."""
        path = Path(path)
        values = self.train_config()
        if data is not None:
            values["data"] = str(Path(data).resolve())
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(values, sort_keys=False)
        elif path.suffix == ".json":
            text = json.dumps(values, indent=1) + "\n"
        else:
            raise ConfigError(f"{path}: write the train config as .json, .yaml or .yml")
        atomic_write_text(path, text)
        return path

    def format(self, data: str | None = None) -> str:
        from .report import format_recommendation

        return format_recommendation(self, data)


def recommend_config(model_or_dir, task: str = "causal-lm", examples: int | None = None, memory_gb: float | None = None,
                     priority: str = "quality", seq: int = 512, device: str | None = None,
                     study: Study | None = None) -> Recommendation:
    """A starting LoraConfig (`.config`) and `lorakit train` settings (`.train_config()`, `.command()`), each with a
    reason from lorakit's study or memory plan (`.settings`).

    `model_or_dir`: a model directory, its config.json, "builtin", or a transformers config/model (only the config
    is read). `examples`: rows in the training data. `memory_gb`: GiB of accelerator memory (of RAM with
    device="cpu"); None plans without a budget. `priority`: "quality", "speed" or "memory". `seq`: tokens per row.
    Refuses nothing: when even QLoRA cannot fit, `fits` is False and `memory_note` says what it would need.
    """
    _check(task, priority, examples, memory_gb, seq)
    study = study if study is not None else Study.load()
    base, source = _resolve_model(model_or_dir)
    config = load_config(source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    band, band_how = study.noise(task)
    notes = [f"noise band: {band:.3f} score points, {band_how}" if band is not None else band_how]
    bundled = base == BUILTIN and examples is None
    if bundled:  # `lorakit train --base builtin` without --data trains on the bundled data: plan for its rows
        from ..train.builtin import default_data_path

        with open(default_data_path(task), encoding="utf-8") as f:
            examples = sum(1 for line in f if line.strip())
        notes.append(f"examples: the {examples} rows of lorakit's bundled {task} data (pass --examples for your own)")
    precision = "bf16" if device == "cuda" else "fp32"
    method, adapter, chosen = _adapter_settings(study, task, priority, band, config, examples, notes)
    train = {"base": base, "task": task, "method": method, **chosen, "max_length": seq, "precision": precision}
    lora = LoraMethod().lora_config(TrainConfig(**{**train, "method": "lora"}))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fit = fit_memory(source, lora, seq, dtype, device, memory_gb, method, priority)
    if method == "full" and fit.rung.method != "full":
        method = train["method"] = "lora"
        adapter[0] = Setting("method", "lora", f"{adapter[0].reason}; but full FT peaks at {gib(fit.tried[-1][2])} at "
                                               f"batch 1 (memory plan), more than {HEADROOM:.0%} of {memory_gb:g} GiB: "
                                               "LoRA", "study+plan")
    run = _run_settings(study, task, examples, method, fit, memory_gb, train)
    memory, extra = _memory_settings(study, task, fit, memory_gb, priority, notes)
    train.update(extra)
    settings = adapter + run + memory + [_precision_setting(precision, reference(study, task))]
    if method == "full":
        train = {k: v for k, v in train.items() if k not in LORA_ONLY}
        settings = [s for s in settings if s.name not in ("targets", "rank", "alpha", "layers", "dropout")]
    TrainConfig(**train)  # the recommendation must be a valid `lorakit train` config
    note = cannot_fit(fit, memory_gb, seq) if not fit.fits else None
    return Recommendation(_model_label(model_or_dir, config), task, priority, examples, memory_gb, device, settings,
                          train, None if method == "full" else lora, fit, fit.fits, note, study, notes, bundled)


def _adapter_settings(study, task, priority, band, config, examples, notes) -> tuple[str, list[Setting], dict]:
    """What trains and how: method, targets, rank, alpha, blocks, dropout (the study's sweeps or stated priors)."""
    method, s_method = choose_method(study, task, priority, band)
    targets_row, s_targets = choose_targets(study, task, priority, band)
    s_targets.value, more = _targets_for(targets_row, config.model_type)
    notes += more
    s_rank = choose_rank(study, task, priority, band, targets_row)
    s_alpha = choose_alpha(study, task, s_rank.value, band)
    layers, s_layers = choose_layers(study, task, priority, config.num_hidden_layers)
    s_dropout = choose_dropout(study, task, examples)
    train = {"rank": s_rank.value, "alpha": s_alpha.value, "dropout": s_dropout.value, "targets": s_targets.value,
             "layers_to_transform": layers}
    return method, [s_method, s_targets, s_rank, s_alpha, s_layers, s_dropout], train


def _run_settings(study, task, examples, method, fit: MemoryFit, memory_gb, train: dict) -> list[Setting]:
    """How long and how fast: lr, schedule, epochs or steps, batch and accumulation (adds them to `train`)."""
    ref = reference(study, task)
    batch = ref.done[0]["settings"]["batch_size"] * ref.done[0]["settings"].get("grad_accum", 1) if ref else STUDY_BATCH
    s_lr = choose_lr(study, task, method, fit.plan.base.total)
    length, s_length = choose_length(study, task, examples, batch)
    total = length.get("max_steps") or (None if examples is None else
                                        -(-int(train_rows(examples) * length["epochs"]) // batch))
    schedule, s_schedule = choose_schedule(study, task, total)
    accum = max(1, batch // fit.micro_batch)
    train.update(lr=s_lr.value, **schedule, **length, batch_size=fit.micro_batch, grad_accum=accum,
                 gradient_checkpointing=fit.rung.checkpointing)
    s_batch = Setting("batch", f"{fit.micro_batch} x {accum} accumulation = {fit.micro_batch * accum}",
                      _batch_reason(ref, batch, fit, memory_gb), "study+plan" if ref else "prior+plan")
    return [s_lr, s_schedule, s_length, s_batch]


def _model_label(model_or_dir, config) -> str:
    if isinstance(model_or_dir, (str, os.PathLike)):
        return str(model_or_dir)
    return getattr(config, "name_or_path", "") or f"a {config.model_type} config"


def _check(task, priority, examples, memory_gb, seq) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    if priority not in PRIORITIES:
        raise ConfigError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    if examples is not None and (not isinstance(examples, int) or isinstance(examples, bool) or examples < 1):
        raise ConfigError(f"examples must be a positive integer (rows of training data), got {examples!r}")
    if memory_gb is not None and not (isinstance(memory_gb, (int, float)) and memory_gb > 0):
        raise ConfigError(f"memory_gb must be a positive number of GiB, got {memory_gb!r}")
    if not isinstance(seq, int) or seq < 1:
        raise ConfigError(f"seq must be a positive integer (tokens per row), got {seq!r}")


def _resolve_model(model_or_dir) -> tuple[str | None, Any]:
    """(`--base` value for lorakit train, what the planner reads)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        if str(model_or_dir) == BUILTIN:
            from ..train.builtin import default_model_dir

            return BUILTIN, default_model_dir()
        path = Path(model_or_dir)
        return str(path.parent if path.is_file() else path), path
    return None, model_or_dir


def _targets_for(row, model_type: str) -> tuple[str | list[str], list[str]]:
    """The study's targets (Llama names) for this model's family: all linear layers, attention, or the family's q,v."""
    if row is None:
        return "all-linear", []
    names = row.setting("targets")
    if is_all_linear(names):
        return "all-linear", []
    if set(names) == {"q_proj", "v_proj"} and model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type], []
    if set(names) == set(ATTENTION_NAMES) and model_type in LLAMA_LIKE:
        return list(ATTENTION_NAMES), []
    return "all-linear", [f"the study's targets {names} have no counterpart named in a {model_type} model: all linear layers"]


def _memory_settings(study: Study, task: str, fit: MemoryFit, memory_gb, priority, notes) -> tuple[list[Setting], dict]:
    rung, plan = fit.rung, fit.plan
    peaks = {m: plan.methods[m].peak for m in plan.methods}
    budget = f"{HEADROOM:.0%} of {memory_gb:g} GiB" if memory_gb is not None else "no --memory-gb given"
    where = f"batch {fit.micro_batch} x {plan.seq} tokens, {plan.device}"
    tried = "; ".join(f"{r.describe()} peaks at {gib(p)} at batch {b}" for r, b, p in fit.tried)
    tried = f" ({tried}: over {budget})" if tried else ""
    extra: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    q = rung.method == "qlora"
    if q:
        why = ("the memory priority" if priority == "memory" and not fit.tried else "the first setup that fits") + tried
        evidence = _qlora_evidence(study, task)
        quant = Setting("quantisation", "nf4 (QLoRA)", f"{why}: QLoRA peaks at {gib(peaks['qlora'])} vs LoRA "
                                                       f"{gib(peaks['lora'])} ({where}; memory plan); {evidence}", "plan")
        if "quantize" in fields:
            extra["quantize"] = "nf4"
        else:
            notes.append("this lorakit train has no --quantize yet (the QLoRA issue adds it): the train config below "
                         "trains LoRA on an unquantised base until then")
    else:
        quant = Setting("quantisation", "none", f"{'LoRA' if rung.method == 'lora' else 'full FT'} fits without it: "
                                                f"{gib(peaks[rung.method])} peak ({where}; memory plan; {budget})",
                       "plan")
    ck = Setting("gradient checkpointing", "on" if rung.checkpointing else "off",
                 _checkpointing_reason(fit, budget) + ("" if q else tried), "plan")
    settings = [quant, ck]
    if rung.optim != "adamw":
        settings.append(Setting("optimizer", rung.optim, f"8-bit optimizer states are the last saving the plan has: "
                                                         f"{gib(plan.methods[rung.method].optimizer)} of states", "plan"))
        if "optim" in fields:
            extra["optim"] = rung.optim
        else:
            notes.append("this lorakit train has no --optim yet: it will use AdamW")
    return settings, extra


def _checkpointing_reason(fit: MemoryFit, budget: str) -> str:
    from ..plan import replan

    other = replan(fit.plan, gradient_checkpointing=not fit.rung.checkpointing).methods[fit.rung.method].peak
    on, off = (fit.peak, other) if fit.rung.checkpointing else (other, fit.peak)
    said = f"{gib(off)} peak without, {gib(on)} with (batch {fit.micro_batch}; memory plan)"
    if fit.rung.checkpointing:
        return f"{said}: needed to fit {budget}" if fit.tried else f"{said}: the memory priority"
    return f"{said}: it re-runs each block's forward in backward, so it is off while memory allows ({budget})"


def _batch_reason(ref, batch: int, fit: MemoryFit, memory_gb) -> str:
    source = (f"the study's batch ({ref.done[0]['settings']['batch_size']} x {ref.done[0]['settings'].get('grad_accum', 1)}; "
              f"{ref.brief()})" if ref else f"prior: {STUDY_BATCH} (the study's default run has not finished)")
    if memory_gb is None:
        return f"effective batch {batch}: {source}; micro-batch {fit.micro_batch} without a memory budget"
    return (f"effective batch {batch}: {source}; micro-batch {fit.micro_batch}, the largest that fits {HEADROOM:.0%} of "
            f"{memory_gb:g} GiB ({gib(fit.peak)} peak; memory plan)")


def _precision_setting(precision: str, ref) -> Setting:
    if precision == "bf16":
        return Setting("precision", precision, "bf16 on a GPU: half the memory of fp32 for the base (the memory plan "
                                               "counts it so); the study ran fp32 on a CPU (prior)", "prior")
    if ref is None:
        return Setting("precision", precision, "fp32 on a CPU (prior: bf16 is slow on most CPUs)", "prior")
    return Setting("precision", precision, f"fp32 on a CPU, as the study's cells ran ({ref.brief()})", "study")


def _qlora_evidence(study: Study, task: str) -> str:
    table_task, points = study.table(task, "method")
    q = next((p for p in measured(points) if p.label == "QLoRA"), None)
    lora = next((p for p in measured(points) if p.label == "LoRA"), None)
    if q is None or lora is None:
        missing = [p for p in points if p.label == "QLoRA"]
        return (f"its quality is not measured yet{not_run(missing)}; prior: the QLoRA paper's claim that a 4-bit NF4 "
                "base matches 16-bit LoRA")
    study.cite(q, lora)
    return f"the study measured QLoRA {q.text()} vs LoRA {lora.text()}"
