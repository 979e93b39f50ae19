"""Each training setting the recommender picks from the study's measurements, with a one-line reason that names
the cells and their numbers, or says the cells have not finished and falls back to a prior marked as one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import TINY_DATA_ROWS
from .study import Point, Study

PRIORITIES = ("quality", "speed", "memory")
ALL_LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# Stated priors, used only where the study has no measurement yet; each reason that uses one says so.
PRIORS = {
    "method": "the LoRA write-ups' claim that LoRA reaches 95-100% of full fine-tuning at under 1% of the parameters",
    "rank": "the LoRA write-ups' claim that low ranks (1-8) are often enough",
    "targets": "the LoRA write-ups' claim that adapting all linear layers beats attention-only at the same "
               "parameter count",
    "alpha": "the LoRA write-ups' alpha = 2r as a safe start",
    "lr": "2e-4, the usual LoRA starting learning rate in the write-ups",
    "full-lr": "1e-5, the usual full fine-tuning learning rate in the write-ups",
    "epochs": "one pass over a large data set; several over a small one",
}
PRIOR_RANK = 8
MAX_EPOCHS = 10  # prior: more passes than this over a few rows overfit


@dataclass
class Setting:
    """One recommended setting: its value, why, and where the reason comes from (study, plan, prior, or both)."""

    name: str
    value: Any
    reason: str
    source: str  # "study", "plan", "prior", "study+plan", "study+prior"


def measured(points: list[Point]) -> list[Point]:
    return [p for p in points if p.score is not None]


def not_run(points: list[Point]) -> str:
    names = [c["name"] for p in points for c in p.cells if c["status"] != "done"]
    return f"; not finished yet: {', '.join(names)}" if names else ""


def so_far(study: Study, done: list[Point], name: str = "") -> str:
    """"; measured so far: r=8 0.842 exact match (lora-r8-s0)" for a sweep with fewer than two finished rows."""
    study.cite(*done)
    return "".join(f"; measured so far: {name}{p.label} {p.text()}" for p in done)


def is_all_linear(names) -> bool:
    """The study's "all linear" rows name Llama's seven projections."""
    return names == "all-linear" or ALL_LINEAR_NAMES <= set(names or [])


def describe_targets(names) -> str:
    if is_all_linear(names):
        return "all linear layers"
    return ", ".join(names) if isinstance(names, list) else str(names)


def _from(task: str, table_task: str) -> str:
    return "" if task == table_task else f" (measured on the {table_task} task: the {task} grid has no such sweep)"


def choose_method(study: Study, task: str, priority: str, band: float | None) -> tuple[str, Setting]:
    """"lora" or "full": full fine-tuning only when the study measured it above LoRA by more than the noise band
    and quality is the priority (the memory plan may still overrule it)."""
    table_task, points = study.table(task, "headline")
    lora = next((p for p in measured(points) if p.setting("method") == "lora"), None)
    full = next((p for p in measured(points) if p.setting("method") == "full"), None)
    if lora is None or full is None:
        missing = [c["name"] for p in points for c in p.cells if c["status"] != "done"]
        have = f"; LoRA r=8 reached {lora.text()}" if lora else ""
        if lora:
            study.cite(lora)
        return "lora", Setting("method", "lora", f"full FT vs LoRA not measured yet ({', '.join(missing) or 'no cells'} "
                                                 f"not finished){have}; prior: {PRIORS['method']}", "prior")
    study.cite(lora, full)
    gap = full.score - lora.score
    costs = _costs(lora, full)
    if priority == "quality" and band is not None and gap > band:
        return "full", Setting("method", "full", f"full FT reached {full.text()} vs LoRA {lora.text()}: {gap:.3f} "
                                                 f"above the noise band {band:.3f}{costs}{not_run(points)}", "study")
    verdict = ("LoRA is as good within the noise band" + (f" {band:.3f}" if band is not None else "") if gap > -1e-12
               else "LoRA scored higher")
    return "lora", Setting("method", "lora", f"LoRA r=8 reached {lora.text()} vs full FT {full.text()}: {verdict}"
                                             f"{costs}{not_run(points)}", "study")


def _costs(lora: Point, full: Point) -> str:
    parts = []
    if lora.mean("trainable_params") and full.mean("trainable_params"):
        parts.append(f"trains {lora.mean('trainable_params') / full.mean('trainable_params'):.2%} as many parameters")
    if lora.mean("peak_memory_bytes") and full.mean("peak_memory_bytes"):
        parts.append(f"{full.mean('peak_memory_bytes') / lora.mean('peak_memory_bytes'):.2f}x less peak memory")
    return "; LoRA " + " and needs ".join(parts) if parts else ""


def choose_targets(study: Study, task: str, priority: str, band: float | None) -> tuple[Point | None, Setting]:
    """Which layers to adapt, from the study's matched-parameter comparison. Returns the chosen row (its cell's
    targets and rank are what the recommendation uses) or None for the prior, all linear layers."""
    table_task, points = study.table(task, "targets")
    done = measured(points)
    if len(done) < 2:
        return None, Setting("targets", "all-linear", f"not measured yet: the targets comparison has fewer than two "
                                                      f"finished rows{so_far(study, done)}{not_run(points)}; prior: {PRIORS['targets']}",
                             "prior")
    study.cite(*done)
    best = max(done, key=lambda p: p.score)
    pick = best
    if priority != "quality" and band is not None:
        key = "step_cpu_seconds_median" if priority == "speed" else "peak_memory_bytes"
        close = [p for p in done if p.score >= best.score - band and p.mean(key) is not None]
        pick = min(close, key=lambda p: p.mean(key)) if close else best
    others = "; ".join(f"{p.label}: {p.text()}" for p in done if p is not pick)
    why = ("the best at matched trainable parameters" if pick is best else
           f"within the noise band {band:.3f} of the best and the {'fastest step' if priority == 'speed' else 'least memory'}")
    return pick, Setting("targets", pick.label, f"{pick.label}: {pick.text()}, {why}; {others}"
                                                f"{_from(task, table_task)}{not_run(points)}", "study")


def choose_rank(study: Study, task: str, priority: str, band: float | None, targets: Point | None) -> Setting:
    """The rank: from the rank sweep (on the study's default targets), or the rank of the matched-parameter
    targets row when another set of targets was chosen."""
    table_task, points = study.table(task, "rank")
    sweep_targets = next((p.setting("targets") for p in measured(points)), None)
    if targets is not None and targets.setting("targets") != sweep_targets:
        r = targets.setting("rank")
        return Setting("rank", r, f"r={r}: the rank of the chosen targets row ({targets.text()}), matched to the "
                                  f"trainable parameters of the other rows", "study")
    done = sorted(measured(points), key=lambda p: p.label)
    if len(done) < 2:
        r = PRIOR_RANK
        return Setting("rank", r, f"not measured yet: the rank sweep has fewer than two finished ranks"
                                  f"{so_far(study, done, 'r=')}"
                                  f"{not_run(points)}; prior: r={r}, {PRIORS['rank']}", "prior")
    study.cite(*done)
    best = max(done, key=lambda p: (p.score, -p.label))
    if priority == "quality" or band is None:
        pick, why = best, "the best held-out score in the rank sweep"
    else:
        pick = next(p for p in done if p.score >= best.score - band)
        why = f"the smallest rank within the noise band {band:.3f} of the best (r={best.label}: {best.score:.3f})"
    others = ", ".join(f"r={p.label} {p.score:.3f}" for p in done if p is not pick)
    return Setting("rank", pick.label, f"r={pick.label}: {pick.text()}, {why}; also measured: {others} (the sweep "
                                       f"adapts {describe_targets(sweep_targets)}){_from(task, table_task)}"
                                       f"{not_run(points)}", "study")


def choose_alpha(study: Study, task: str, rank: int, band: float | None) -> Setting:
    """alpha as a multiple of r, from the alpha sweep at r=8; kept inside the range LoraConfig does not warn about."""
    table_task, points = study.table(task, "alpha")
    done = measured(points)
    sweep_r = next((p.setting("rank") for p in done), 8)
    if len(done) < 2:
        return Setting("alpha", 2 * rank, f"alpha={2 * rank} (alpha/r = 2): not measured yet: the alpha sweep has fewer "
                                          f"than two finished rows{so_far(study, done, 'alpha=')}{not_run(points)}; prior: {PRIORS['alpha']}", "prior")
    study.cite(*done)
    best = max(done, key=lambda p: p.score)
    sane = [p for p in done if 1 / 8 < p.label / sweep_r < 16]
    two = next((p for p in sane if p.label == 2 * sweep_r), None)
    if two is not None and (band is None or two.score >= best.score - band):
        pick, why = two, "alpha/r = 2 is within the noise band of the best" if two is not best else "the best"
    elif sane:
        pick = max(sane, key=lambda p: p.score)
        why = "the best outside the range lorakit warns about (alpha/r at or below 1/8, at or above 16)"
    else:
        return Setting("alpha", 2 * rank, f"alpha={2 * rank} (alpha/r = 2): the alpha sweep measured only ratios "
                                          f"lorakit warns about{so_far(study, done, 'alpha=')}; prior: {PRIORS['alpha']}",
                       "prior")
    ratio = pick.label / sweep_r
    alpha = int(ratio * rank) if float(ratio * rank).is_integer() else ratio * rank
    others = "; ".join(f"alpha={p.label}: {p.text()}" for p in done if p is not pick)
    return Setting("alpha", alpha, f"alpha/r = {ratio:g} (measured at r={sweep_r}: alpha={pick.label} reached "
                                          f"{pick.text()}), {why}; {others}{_from(task, table_task)}{not_run(points)}",
                   "study")


def choose_lr(study: Study, task: str, method: str, model_params: int) -> Setting:
    table_task, points = study.table(task, "full-lr" if method == "full" else "lr")
    if method == "full":  # the headline full FT rows are the sweep's reference point
        _, head = study.table(task, "headline")
        points = points + [p for p in head if p.setting("method") == "full"]
    done = measured(points)
    prior = PRIORS["full-lr" if method == "full" else "lr"]
    if len(done) < 2:
        value = 1e-5 if method == "full" else 2e-4
        return Setting("lr", value, f"not measured yet: the learning-rate sweep has fewer than two finished rows"
                                    f"{so_far(study, done, 'lr=')}{not_run(points)}; prior: {prior}", "prior")
    study.cite(*done)
    best = max(done, key=lambda p: p.score)
    lr = best.setting("lr")
    others = "; ".join(f"{p.setting('lr'):g}: {p.text()}" for p in done if p is not best)
    steps = best.setting("max_steps")
    measured_on = best.done[0].get("total_params") or model_params
    caveat = (f"; measured on a {measured_on / 1e6:.0f}M-parameter model: a model {model_params / measured_on:.0f}x "
              f"larger usually wants a lower lr (prior), so treat it as an upper end"
              if model_params > 10 * measured_on else "")
    return Setting("lr", lr, f"lr={lr:g}: {best.text()}, the best of the sweep ({steps} steps); {others}"
                             f"{_from(task, table_task)}{not_run(points)}{caveat}", "study+prior" if caveat else "study")


def reference(study: Study, task: str) -> Point | None:
    """The task's headline LoRA row: the study's default run, which the schedule and length settings follow."""
    _, points = study.table(task, "headline")
    return next((p for p in measured(points) if p.setting("method") == "lora"), None)


def train_rows(examples: int) -> int:
    """Rows `lorakit train` trains on out of `examples` with its default held-out split (10%, at most 200)."""
    return examples - min(int(round(examples * 0.1)), 200)


def choose_length(study: Study, task: str, examples: int | None, batch: int) -> tuple[dict, Setting]:
    """Epochs (or steps, for a small data set) from the study's run length. Returns TrainConfig values and the reason."""
    ref = reference(study, task)
    if ref is None or not ref.done[0].get("train_rows"):
        epochs = 1 if examples is None or train_rows(examples) >= 1000 else 3
        return {"epochs": epochs}, Setting("epochs", epochs, f"{epochs} epoch(s): the study's default run has not "
                                                             f"finished; prior: {PRIORS['epochs']}", "prior")
    study.cite(ref)
    s = ref.done[0]["settings"]
    ref_steps, ref_batch, ref_rows = s["max_steps"], s["batch_size"] * s.get("grad_accum", 1), ref.done[0]["train_rows"]
    ref_epochs = ref_steps * ref_batch / ref_rows
    told = f"the study's {ref.names} trained {ref_epochs:.3g} epoch(s) ({ref_steps} steps x batch {ref_batch} on {ref_rows} rows) to {ref.text()}"
    if examples is None:
        return {"epochs": round(ref_epochs, 3)}, Setting("epochs", f"{ref_epochs:.3g}", f"number of examples not given: "
                                                                                          f"as {told}", "study")
    rows = train_rows(examples)
    if rows * ref_epochs / batch >= ref_steps:
        epochs = round(ref_epochs, 3)
        return {"epochs": epochs}, Setting("epochs", f"{epochs:g}", f"{epochs:g} epoch(s) = {math.ceil(rows * epochs / batch)} "
                                                             f"steps on {rows} training rows: {told}", "study")
    steps = min(ref_steps, max(1, math.floor(MAX_EPOCHS * rows / batch)))
    capped = f"; capped at {MAX_EPOCHS} epochs (prior: more passes over so few rows overfit)" if steps < ref_steps else ""
    return {"max_steps": steps}, Setting("steps", steps, f"{steps} steps = {steps * batch / rows:.1f} epochs of {rows} "
                                                         f"training rows: as many updates as {told}{capped}",
                                         "study+prior" if capped else "study")


def choose_schedule(study: Study, task: str, total_steps: int | None) -> tuple[dict, Setting]:
    ref = reference(study, task)
    if ref is None:
        warmup = 5 if total_steps is None else max(1, round(0.05 * total_steps))
        return ({"schedule": "linear", "warmup_steps": warmup},
                Setting("schedule", f"linear, {warmup} warm-up steps", "the study's default run has not finished; prior: "
                                   "linear decay after a short warm-up (about 5% of the steps)", "prior"))
    study.cite(ref)
    s = ref.done[0]["settings"]
    frac = s.get("warmup_steps", 0) / s["max_steps"]
    warmup = s.get("warmup_steps", 0) if total_steps is None else max(1, round(frac * total_steps))
    return ({"schedule": s.get("schedule", "linear"), "warmup_steps": warmup},
            Setting("schedule", f"{s.get('schedule', 'linear')}, {warmup} warm-up steps",
                    f"as every study cell: {s.get('schedule', 'linear')} decay after {s.get('warmup_steps', 0)} warm-up "
                    f"steps of {s['max_steps']} ({frac:.0%}; {ref.brief()}); schedules were not compared (prior)",
                    "study+prior"))


def choose_dropout(study: Study, task: str, examples: int | None) -> Setting:
    ref = reference(study, task)
    tiny = (f"; with {examples} examples dropout would mostly add noise (lorakit train warns about dropout under "
            f"{TINY_DATA_ROWS} rows)") if examples is not None and examples < TINY_DATA_ROWS else ""
    if ref is None:
        return Setting("dropout", 0.0, f"prior: no LoRA dropout{tiny}", "prior")
    study.cite(ref)
    return Setting("dropout", 0.0, f"the study's cells train without dropout ({ref.brief()}); dropout was not varied "
                                   f"(prior){tiny}", "study+prior")


def choose_layers(study: Study, task: str, priority: str, num_layers: int) -> tuple[list[int] | None, Setting]:
    """Which blocks: the study's default run adapts the top blocks only for causal LM (backward stops at the lowest
    adapted block); speed and memory follow it, quality adapts every block (not measured: a prior)."""
    ref = reference(study, task)
    layers = ref.setting("layers_to_transform") if ref else None
    if not layers:
        return None, Setting("layers", "all blocks", f"as the study's {task} cells ({ref.brief()})" if ref else
                             "prior: every block", "study" if ref else "prior")
    study.cite(ref)
    study_blocks = max(layers) + 1
    share = len(layers) / study_blocks
    described = f"the study's default run adapts the top {len(layers)} of {study_blocks} blocks ({ref.brief()})"
    if priority == "quality":
        return None, Setting("layers", "all blocks", f"{described}; adapting every block was not measured (prior: more "
                                                     "blocks, more capacity, a longer backward)", "study+prior")
    n = max(1, round(share * num_layers))
    top = list(range(num_layers - n, num_layers))
    return top, Setting("layers", f"top {n} of {num_layers} blocks ({top[0]}-{top[-1]})",
                        f"{described}: backward stops at the lowest adapted block, so the step is shorter and "
                        "fewer activations are kept", "study")
