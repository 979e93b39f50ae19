"""The quality study's report: collect the finished cells of bench/quality.py into a JSON file and render it
as Markdown tables, PNG plots and plain verdicts on the write-ups' claims, from the measured numbers only."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

SCORE = {"causal-lm": ("exact_match", "exact match"), "classify": ("accuracy", "accuracy")}
CLS_LORA = "LoRA r=8 (q,v)"  # the second task's headline LoRA row
HEADLINE_FULL_LR = 1e-4  # the learning rate of the headline full-FT cells (bench/quality.py)
STEP_HEADER = "step time, median (wall / CPU)"
METHOD_ORDER = ["LoRA", "full FT", "DoRA", "VeRA", "VeRA (lr 3e-2)", "AdaLoRA", "AdaLoRA (lr 5e-3)", "PiSSA", "QLoRA", "QLoRA + LoftQ"]


# --- collecting --------------------------------------------------------------------------------------------


def collect(cells, results: Path) -> dict:
    found = {}
    for cell in cells:
        out = results / "cells" / cell.name
        record_path = results / "records" / f"{cell.name}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        entry = {"task": cell.task, "seed": cell.seed, "flags": cell.flags, "rows": cell.rows,
                 "status": "done" if (out / "metrics.json").exists() else record.get("status", "not run")}
        if entry["status"] == "pending":
            entry["reason"] = record.get("reason")
        if entry["status"] == "done":
            entry.update(_summary(json.loads((out / "metrics.json").read_text()), cell.task), resumed=record.get("resumed"),
                         commit=record.get("commit"))
        found[cell.name] = entry
    return {"generated": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "cells": found}


def _summary(m: dict, task: str) -> dict:
    key = SCORE[task][0]
    config = m.get("config", {})
    s = {
        "score": m["final"].get(key), "eval_loss": m["final"].get("eval_loss"), "f1_macro": m["final"].get("f1_macro"),
        "trainable_params": m["trainable_params"], "total_params": m["total_params"],
        "step_seconds_mean": m.get("step_seconds_mean"), "step_seconds_median": m.get("step_seconds_median"),
        "step_cpu_seconds_median": m.get("step_cpu_seconds_median"),
        "peak_memory_bytes": m.get("peak_memory_bytes"), "peak_memory_measure": m.get("peak_memory_measure"),
        "seconds": m.get("seconds"), "steps": m.get("steps"), "stopped_reason": m.get("stopped_reason"),
        "diagnostics": m.get("diagnostics", []), "method": m.get("method", config.get("method", "lora")),
        "lr": config.get("lr"), "rank": config.get("rank"), "alpha": config.get("alpha"),
        "eval_examples": _eval_examples(config),
        "train_loss": [round(v, 4) for _, v in m.get("train_loss", [])],
    }
    if m.get("base"):
        s.update(base_score=m["base"].get(key), base_eval_loss=m["base"].get("eval_loss"))
    return s


def _eval_examples(config: dict) -> int | None:
    try:
        rows = sum(1 for line in open(config["data"], encoding="utf-8") if line.strip())
    except (KeyError, OSError, TypeError):
        return None
    n = int(round(rows * config.get("eval_fraction", 0.1)))
    return min(n, config["max_eval"]) if config.get("max_eval") else n


def _machine() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# --- rows and numbers --------------------------------------------------------------------------------------


class Row:
    """The cells of one table row (one per seed) and their numbers."""

    def __init__(self, label, entries: list[dict]):
        self.label, self.entries = label, entries
        self.done = [e for e in entries if e["status"] == "done"]

    def mean(self, key: str) -> float | None:
        values = [e[key] for e in self.done if e.get(key) is not None]
        return statistics.fmean(values) if values else None

    @property
    def score(self) -> float | None:
        return self.mean("score")

    @property
    def spread(self) -> float | None:
        values = [e["score"] for e in self.done if e.get("score") is not None]
        return max(values) - min(values) if len(values) > 1 else None

    @property
    def status(self) -> str:
        if self.done:
            return "done" if len(self.done) == len(self.entries) else f"{len(self.done)}/{len(self.entries)} done"
        states = {e["status"] for e in self.entries}
        return "pending" if "pending" in states else ("failed" if "failed" in states else "not run")


def rows_of(data: dict, table: str) -> list[Row]:
    groups: dict = {}
    for entry in data["cells"].values():
        if table in entry["rows"]:
            groups.setdefault(entry["rows"][table], []).append(entry)
    keys = list(groups)
    if all(isinstance(k, (int, float)) for k in keys):
        keys.sort()
    elif table == "method":
        keys.sort(key=lambda k: METHOD_ORDER.index(k) if k in METHOD_ORDER else len(METHOD_ORDER))
    return [Row(k, groups[k]) for k in keys]


def row(data: dict, table: str, label) -> Row | None:
    return next((r for r in rows_of(data, table) if r.label == label), None)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _score_cell(r: Row) -> str:
    if not r.done:
        return r.status
    values = [e["score"] for e in r.done]
    if len(values) == 1:
        return _pct(values[0]) + _stopped(r)
    return f"{_pct(r.score)} (seeds: {', '.join(_pct(v) for v in values)}; spread {100 * r.spread:.1f} pts)" + _stopped(r)


def _stopped(r: Row) -> str:
    return " (stopped: NaN/Inf)" if any(e.get("stopped_reason") for e in r.done) else ""


def _params(r: Row) -> str:
    e = r.done[0] if r.done else None
    if e is None:
        return "–"
    return f"{e['trainable_params']:,} ({100 * e['trainable_params'] / e['total_params']:.3g}%)"


def _step(r: Row) -> str:
    """Median seconds per step, wall clock and CPU (CPU time does not count waiting for a shared core)."""
    wall, cpu = r.mean("step_seconds_median"), r.mean("step_cpu_seconds_median")
    return "–" if wall is None else f"{wall:.2f} s / {cpu:.2f} s" if cpu is not None else f"{wall:.2f} s / –"


def _gib(v: float | None) -> str:
    return "–" if v is None else f"{v / 2**30:.2f} GiB"


def _table(header: list[str], lines: list[list[str]], numbers: bool = True) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned when they hold numbers."""
    rule = [" --- " if i == 0 or not numbers else " ---: " for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def cost_table(rows: list[Row], first: str, metric: str, before: list[list[str]] = ()) -> str:
    lines = [*before] + [[_label(r.label), _params(r), _score_cell(r), _num(r.mean("eval_loss")), _step(r),
                          _gib(r.mean("peak_memory_bytes"))] for r in rows]
    return _table([first, "trainable params", f"held-out {metric}", "eval loss", STEP_HEADER, "peak memory"], lines)


def _label(v) -> str:
    """Row labels: 1e-4 for learning rates, 16 for α and ranks, text as it is."""
    if isinstance(v, float) and v < 0.01:
        mantissa, exponent = f"{v:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def noise(data: dict, table: str = "headline", label: str = "LoRA r=8") -> float:
    """A difference smaller than this is not evidence: the seed spread of the headline LoRA row, or twice the
    binomial standard error of its score on the held-out set, whichever is larger."""
    r = row(data, table, label)
    if r is None or r.score is None:
        return 0.05
    n = next((e["eval_examples"] for e in r.done if e.get("eval_examples")), 120)
    return max(r.spread or 0.0, 2 * math.sqrt(r.score * (1 - r.score) / n))


# --- verdicts on the write-ups' claims ----------------------------------------------------------------------


def claims(data: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, the numbers behind it) for each claim; verdicts come from the measurements only."""
    band, cls_band = noise(data), noise(data, "cls-headline", CLS_LORA)
    found = [_claim_lora_vs_full(data), _claim_lora_vs_full(data, "cls-headline", CLS_LORA),
             _claim_low_rank(data, band), _claim_targets(data, band),
             _claim_targets(data, cls_band, "cls-targets", "all linear r=3"), *_claim_alpha(data, band),
             _claim_dora(data, band)]
    return [c for c in found if c is not None]


def _claim_lora_vs_full(data, table: str = "headline", lora_label: str = "LoRA r=8"):
    claim = "LoRA reaches 95-100% of full fine-tuning at under 1% of the parameters and 3-4x less memory"
    if table != "headline":
        claim += " (second task)"
    lora, full = row(data, table, lora_label), row(data, table, "full FT")
    if not (lora and full and lora.done and full.done):
        return claim, "not measured yet", ""
    ratio = lora.score / full.score if full.score else float("inf")
    share = lora.done[0]["trainable_params"] / lora.done[0]["total_params"]
    memory = full.mean("peak_memory_bytes") / lora.mean("peak_memory_bytes")
    by_lr = {r.label: r for r in rows_of(data, "full-lr") if r.score is not None} if table == "headline" else {}
    best_full = max(by_lr.values(), key=lambda r: r.score, default=None)
    if best_full is not None and (HEADLINE_FULL_LR not in by_lr or best_full.score <= by_lr[HEADLINE_FULL_LR].score):
        best_full = None  # the headline's learning rate was the best full-FT one measured
    parts = [f"{lora_label} scored {_pct(lora.score)}, full FT (lr 1e-4) {_pct(full.score)}: {100 * ratio:.0f}% of full FT",
             f"with {100 * share:.2f}% of the parameters trainable",
             f"full FT's peak memory was {memory:.2f}x LoRA's ({_gib(full.mean('peak_memory_bytes'))} vs "
             f"{_gib(lora.mean('peak_memory_bytes'))})"]
    if best_full is not None and best_full.score > full.score:
        parts.append(f"full FT scored higher at lr {_label(best_full.label)} ({_pct(best_full.score)}, one seed), and LoRA "
                     f"reached {100 * lora.score / best_full.score:.0f}% of that")
    quality = ratio >= 0.95 and (best_full is None or lora.score / best_full.score >= 0.95)
    verdicts = [("quality", quality), ("parameters", share < 0.01), ("memory", memory >= 3)]
    held = [k for k, ok in verdicts if ok]
    verdict = "held" if len(held) == 3 else ("did not hold" if not held else
                                              f"partly: held for {', '.join(held)}; not for "
                                              f"{', '.join(k for k, ok in verdicts if not ok)}")
    return claim, verdict, "; ".join(parts) + "."


def _claim_low_rank(data, band):
    claim = "Low ranks (1-8) are often enough"
    rows = [r for r in rows_of(data, "rank") if r.score is not None]
    if len(rows) < 3:
        return claim, "not measured yet", ""
    best = max(rows, key=lambda r: r.score)
    low = [r for r in rows if r.label <= 8]
    enough = [r.label for r in low if r.score >= best.score - band]
    detail = (", ".join(f"r={r.label}: {_pct(r.score)}" for r in rows)
              + f". Best: r={best.label}. Within the noise band ({100 * band:.1f} pts) of the best: "
              + (", ".join(f"r={x}" for x in enough) if enough else "no rank of 8 or less"))
    verdict = "held" if enough else "did not hold"
    if enough and min(enough) > 1:
        verdict += f" from r={min(enough)} up"
    return claim, verdict, detail + "."


def _claim_targets(data, band, table: str = "targets", all_label: str = "all linear r=8"):
    claim = "Adapting all linear layers beats attention-only at the same parameter count"
    if table != "targets":
        claim += " (second task)"
    rows = {r.label: r for r in rows_of(data, table) if r.score is not None}
    full_row, others = rows.get(all_label), [r for k, r in rows.items() if k != all_label]
    if full_row is None or not others:
        return claim, "not measured yet", ""
    detail = ", ".join(f"{r.label}: {_pct(r.score)} ({r.done[0]['trainable_params']:,} params)"
                       for r in [full_row, *others])
    margins = [(r.label, full_row.score - r.score) for r in others]
    beat = [f"{label} by {100 * m:.1f} pts" for label, m in margins if m > band]
    lost = [f"{label} by {100 * -m:.1f} pts" for label, m in margins if m < -band]
    even = [f"{label} ({100 * m:+.1f} pts)" for label, m in margins if -band <= m <= band]
    if len(beat) == len(margins):
        verdict = "held: all linear beat " + ", ".join(beat)
    elif lost:
        verdict = "did not hold: all linear lost to " + ", ".join(lost)
    else:
        verdict = ("partly: all linear beat " + ", ".join(beat) + "; " if beat else "not shown: ") + (
            f"within the noise band ({100 * band:.1f} pts) of " + ", ".join(even))
    return claim, verdict, detail + "."


def _claim_alpha(data, band):
    rows = {r.label: r for r in rows_of(data, "alpha") if r.score is not None}
    safe = "alpha = 2r is a safe start"
    breaks = "alpha far from r breaks training (alpha = 1 or 128 at r = 8)"
    if 16 not in rows or len(rows) < 2:
        return [(safe, "not measured yet", ""), (breaks, "not measured yet", "")]
    best = max(rows.values(), key=lambda r: r.score)
    detail = ", ".join(f"α={k:g}: {_pct(r.score)}{_stopped(r)}" for k, r in sorted(rows.items()))
    safe_verdict = "held" if rows[16].score >= best.score - band else f"did not hold (α={best.label:g} was better)"
    far = [rows[k] for k in (1, 128) if k in rows]
    broken = [r for r in far if r.score < rows[16].score - band or _stopped(r)]
    if not far:
        far_verdict = "not measured yet"
    elif len(broken) == len(far):
        far_verdict = "held"
    elif broken:
        far_verdict = "partly: " + ", ".join(f"α={r.label:g}" for r in broken) + " fell behind, " + ", ".join(
            f"α={r.label:g}" for r in far if r not in broken) + " did not"
    else:
        far_verdict = "did not hold: neither α=1 nor α=128 fell outside the noise band"
    return [(safe, safe_verdict, detail + "."), (breaks, far_verdict, detail + f"; noise band {100 * band:.1f} pts.")]


def _claim_dora(data, band):
    claim = "DoRA adds quality at low rank"
    pairs = [(row(data, "dora", f"DoRA r={r}"), row(data, "rank", r)) for r in (2, 8)]
    pairs = [(d, l) for d, l in pairs if d and l and d.score is not None and l.score is not None]
    if not pairs:
        return claim, "pending (its cells have not run yet)" if row(data, "dora", "DoRA r=2") else "not measured", ""
    detail = "; ".join(f"{d.label}: {_pct(d.score)} vs LoRA r={l.label}: {_pct(l.score)}" for d, l in pairs)
    gains = [d.score - l.score for d, l in pairs]
    verdict = "held" if gains[0] > band else ("did not hold" if gains[0] < -band else "not shown (within the noise band)")
    return claim, verdict, detail + "."


# --- plots -------------------------------------------------------------------------------------------------


def plots(data: dict, folder: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    base = _base_entry(data, "causal-lm").get("base_score")
    full = row(data, "headline", "full FT")
    refs = [(full.score if full else None, "full FT (lr 1e-4)", "#e6550d"), (base, "base model", "#777777")]
    for table, xlabel, name in (("rank", "LoRA rank r (all linear layers, α = 2r)", "rank"),
                                ("alpha", "α at r = 8", "alpha"), ("cls-rank", "LoRA rank r (q,v; classification)", "cls_rank")):
        rows = [r for r in rows_of(data, table) if r.score is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        ax.plot([r.label for r in rows], [100 * r.score for r in rows], "o-", color="#3182bd", label="LoRA")
        for value, label, color in (refs if not table.startswith("cls") else []):
            if value is not None:
                ax.axhline(100 * value, linestyle="--", color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r.label for r in rows], [f"{r.label:g}" for r in rows])
        _finish_plot(plt, fig, ax, xlabel, folder / f"{name}.png", made, name)
    lr_rows = {"LoRA r=8": rows_of(data, "lr"), "full FT": rows_of(data, "full-lr")}
    if any(r.score is not None for rows in lr_rows.values() for r in rows):
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for (label, rows), color in zip(lr_rows.items(), ("#3182bd", "#e6550d")):
            rows = [r for r in rows if r.score is not None]
            if rows:
                ax.plot([r.label for r in rows], [100 * r.score for r in rows], "o-", color=color, label=label)
        ax.set_xscale("log")
        _finish_plot(plt, fig, ax, "learning rate", folder / "lr.png", made, "lr")
    pairs = [(t, row(data, t, "LoRA r=8" if t == "headline" else "LoRA r=8 (q,v)"), row(data, t, "full FT"))
             for t in ("headline", "cls-headline")]
    pairs = [(t, lo, fu) for t, lo, fu in pairs if lo and fu and lo.done and fu.done]
    if pairs:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), dpi=120)
        for ax, (key, title, scale) in zip(axes, (("score", "held-out score (%)", 100),
                                                  ("step_cpu_seconds_median", "CPU seconds per step", 1),
                                                  ("peak_memory_bytes", "peak memory (GiB)", 2**-30))):
            labels, values, colors, seeds = [], [], [], []
            for table, lo, fu in pairs:
                task = "words" if table == "headline" else "glosses"
                for r, color in ((lo, "#3182bd"), (fu, "#e6550d")):
                    labels.append(f"{'LoRA' if r is lo else 'full'}\n{task}")
                    values.append(r.mean(key) * scale)
                    colors.append(color)
                    seeds += [(len(labels) - 1, e[key] * scale) for e in r.done if e.get(key) is not None]
            ax.bar(range(len(labels)), values, color=colors, tick_label=labels)
            ax.plot(*zip(*seeds), "k.", label="each seed")  # the spread behind each mean
            ax.set_title(title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        _save(plt, fig, folder / "lora_vs_full.png", made, "lora_vs_full")
    return made


def _finish_plot(plt, fig, ax, xlabel, path, made, name):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out score (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path, made, name)


def _save(plt, fig, path, made, name):
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    plt.close(fig)
    made[name] = path


# --- the document ------------------------------------------------------------------------------------------


def write_report(cells, results: Path, doc: Path) -> dict:
    """Collect the cells into DOC's .json, draw the plots into DOC's folder, write DOC; returns the data."""
    data = collect(cells, results)
    doc.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(doc.with_suffix(".json"), json.dumps(data, indent=1, sort_keys=True) + "\n")
    images = plots(data, doc.parent / doc.stem)
    _atomic_text(doc, render(data, {k: os.path.relpath(v, doc.parent) for k, v in images.items()}))
    return data


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render(data: dict, images: dict[str, str]) -> str:
    cells = data["cells"]
    counts = {s: sum(e["status"] == s for e in cells.values()) for s in ("done", "pending", "failed", "not run")}
    m = data["machine"]
    band = noise(data)
    out = [
        "# Does LoRA hold up? Measured on the built-in model",
        "",
        f"Generated {data['generated']} by `bench/quality.py` from {counts['done']} finished cells of {len(cells)} "
        f"({counts['pending']} pending, {counts['failed']} failed, {counts['not run']} not run yet). Every number "
        "below was measured here; nothing is copied from a paper.",
        "",
        "**Protocol.** Each cell is one `lorakit train` run in its own process (`--threads 1`, so peak RSS is the "
        "cell's own) on SmolLM2-135M-Instruct and the bundled WordNet data, at the demo's settings "
        "(`src/lorakit/train/builtin_run.py::demo_settings`: 60 steps, batch 16, lr 1e-3 with 5 warmup steps and "
        "linear decay, max length 64, LoRA r=8 α=16 on all linear layers of the top 12 of 30 blocks) with one "
        "thing changed. Held-out set: the demo's (split seed 0): 120 words for the causal-LM task (score: exact "
        "match of the generated category), 180 glosses for classification (score: accuracy). `--seed` varies "
        "the adapter's initialisation and the data order only. Full fine-tuning (`--method full`) trains every "
        "weight (all 30 blocks and the tied embedding) with the same loop, data and schedule.",
        "",
        f"**Noise.** One held-out word is 0.8 points. A difference below {100 * band:.1f} points (the larger of the "
        "headline LoRA row's seed spread and twice the binomial standard error of its score) is treated as no "
        "difference in the verdicts below.",
        "",
        f"**Machine.** {m.get('cpu', m.get('machine'))}, {m.get('cpus')} cores shared with other work, torch "
        f"{m.get('torch')}; cells ran from {_commits(cells)}. Step times are medians over the 60 optimizer steps "
        "(evaluation and checkpoints excluded), in wall-clock time and in CPU time of the (single-threaded) "
        "process; other jobs shared the cores, so wall-clock time includes waiting for a core and CPU time is "
        "the one to compare. Peak memory is the process's peak RSS over its whole life (model loading and "
        "evaluation included).",
        "",
        "## Headline: base vs LoRA vs full fine-tuning",
        "",
    ]
    base = _base_entry(data, "causal-lm")
    before = ([["base model (no training)", "0", _pct(base["base_score"]), _num(base["base_eval_loss"]), "–", "–"]]
              if base.get("base_score") is not None else [])
    out += [cost_table(rows_of(data, "headline"), "causal LM (word → category)", "exact match", before), ""]
    out += _memory_note(data)
    if images.get("lora_vs_full"):
        out += [f"![LoRA vs full fine-tuning]({images['lora_vs_full']})", ""]
    out += ["## The write-ups' claims, checked", "", _table(["claim", "here", "measured"], claims_rows(data), numbers=False), ""]
    out += _arithmetic_section()
    out += ["## Per method", "", "The table the README shows: each variant at the demo's settings (VeRA and AdaLoRA "
            "also at the learning rate their own tuning found; `bench/variants.py`).", "",
            _table(["method", "trainable params", "held-out exact match", STEP_HEADER, "peak memory", "state"],
                   [[r.label, _params(r), _score_cell(r), _step(r), _gib(r.mean("peak_memory_bytes")), r.status]
                    for r in rows_of(data, "method")]), ""]
    sections = [
        ("Rank (all linear layers, α = 2r)", "rank", "r", "rank"),
        ("Targets at matched trainable parameters", "targets", "targets", None),
        ("α at r = 8", "alpha", "α", "alpha"),
        ("rsLoRA at r = 64", "rslora", "setting", None),
        ("Learning rate, LoRA r = 8", "lr", "lr", "lr"),
        ("Learning rate, full fine-tuning", "full-lr", "lr", None),
        ("DoRA", "dora", "setting", None),
    ]
    for title, table_name, first, image in sections:
        rows = rows_of(data, table_name)
        if rows:
            out += [f"## {title}", "", cost_table(rows, first, "exact match"), ""]
            if table_name == "rslora":
                out += _rslora_note(data)
            if image and images.get(image):
                out += [f"![{title}]({images[image]})", ""]
    out += ["## Second task: WordNet glosses → category (`--task classify`)", "",
            "The same model with a classification head (`score`, trained in every cell) reads a WordNet definition "
            "and names its category; 1,620 training rows, 180 held out. Demo settings for this task: LoRA r=8 α=16 "
            "on q_proj and v_proj of all 30 blocks, 60 steps, batch 16, lr 1e-3.", ""]
    cls_base = _base_entry(data, "classify").get("base_score")
    if cls_base is not None:
        out += [f"Base model with an untrained head: accuracy {_pct(cls_base)} (six classes).", ""]
    for title, table_name in (("LoRA vs full fine-tuning", "cls-headline"), ("Rank (q,v, α = 2r)", "cls-rank"),
                              ("Targets at matched trainable parameters", "cls-targets")):
        rows = rows_of(data, table_name)
        if rows:
            out += [f"### {title}", "", cost_table(rows, "setting", "accuracy"), ""]
    if images.get("cls_rank"):
        out += [f"![classification rank sweep]({images['cls_rank']})", ""]
    if images.get("lr"):
        out += ["## Learning-rate curves", "", f"![learning rate]({images['lr']})", ""]
    out += ["## Running it", "",
            "`python bench/quality.py --results DIR` runs every cell that has no `metrics.json` in `DIR/cells/` yet, "
            "one process at a time, and rewrites this file (`--doc`), its JSON and its plots after each. A killed "
            "cell resumes from its last checkpoint; a cell whose flags `lorakit train` does not accept is "
            "`pending` and is tried again on the next run, so a newer checkout fills in the variants. "
            "`--render` only rewrites the report; `--list` shows each cell's state; `--only NAME ...` runs some "
            "cells. A cell is one line in `CELLS` in `bench/quality.py`: a name, its flags, and the tables it "
            "belongs to.", ""]
    out += ["## Every cell", "", "Reproduce one: `lorakit train --threads 1 --split-seed 0 --seed S` plus its flags "
            "(`--config no_base.json` only switches the base evaluation off). `code`: the last commit that changed "
            "`src/` in the checkout that ran the cell; cells run later by a newer checkout (the variants) say so.",
            "",
            _table(["cell", "task", "seed", "flags", "state", "score", "code", "notes"], numbers=False, lines=[
                [name, e["task"], e["seed"], f"`{e['flags']}`" if e["flags"] else "(demo)", e["status"],
                 _pct(e.get("score")), e.get("commit") or "", _cell_note(e)] for name, e in cells.items()]), ""]
    return "\n".join(out)


ARITHMETIC_DOC = Path(__file__).resolve().parents[1] / "docs" / "arithmetic.md"


def _arithmetic_section() -> list[str]:
    """The write-ups' figures that do not add up: the section of docs/arithmetic.md, which the planner's tests
    (tests/test_plan.py) back, so both documents say the same thing."""
    text = ARITHMETIC_DOC.read_text() if ARITHMETIC_DOC.exists() else ""
    start = text.find("## Figures that do not add up")
    if start < 0:
        return []
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else len(text)].strip().split("\n")[1:]
    return ["## The write-ups' figures that do not add up", "",
            "Parameter counts computed by `lorakit plan` / `trainable_parameters` on meta-device models (no weights; "
            "`tests/test_plan.py`); the whole check, with the memory claims, is in "
            "[arithmetic.md](arithmetic.md).", *body, ""]


def _rslora_note(data: dict) -> list[str]:
    """rsLoRA at α=16, r=64 scales by 16/√64 = 2, as plain LoRA at α=128 does (128/64): the same run."""
    plain, rs = data["cells"].get("lora-r64", {}), data["cells"].get("lora-r64-a16-rslora", {})
    if plain.get("status") != "done" or rs.get("status") != "done":
        return []
    same = plain["train_loss"] == rs["train_loss"] and plain["score"] == rs["score"]
    return ["rsLoRA scales the update by α/√r instead of α/r; at r=64 with α=16 that is 2, the scale plain LoRA "
            "gets from α=128, so the two runs are the same computation. Measured: "
            + ("identical losses at every step and the same score, as they should be." if same else
               "they differ, which they should not: a bug to look at."), ""]


def _memory_note(data: dict) -> list[str]:
    """Where full fine-tuning's extra memory goes, from the measured parameter count."""
    lora, full = row(data, "headline", "LoRA r=8"), row(data, "headline", "full FT")
    if not (lora and full and lora.done and full.done):
        return []
    params = full.done[0]["trainable_params"]
    extra = full.mean("peak_memory_bytes") - lora.mean("peak_memory_bytes")
    return [f"Where full fine-tuning's memory goes: its {params:,} fp32 parameters take {_gib(4 * params)}; training "
            f"all of them adds a gradient and AdamW's two moments for each, {_gib(12 * params)}, and full FT's peak "
            f"was {_gib(extra)} above LoRA's. So full FT with fp32 AdamW needs about 4x the weights' memory and LoRA "
            f"about 1x, plus what every process holds: here {_gib(lora.mean('peak_memory_bytes') - 4 * params)} of "
            f"LoRA's {_gib(lora.mean('peak_memory_bytes'))} peak is not the weights (Python, torch, tokenizer, "
            f"activations, evaluation), which is why the measured ratio is "
            f"{full.mean('peak_memory_bytes') / lora.mean('peak_memory_bytes'):.1f}x, not 4x.", ""]


def _commits(cells: dict) -> str:
    """Which code ran the finished cells (bench/quality.py records the commit of its checkout per cell)."""
    done = [e.get("commit") or "commit not recorded" for e in cells.values() if e["status"] == "done"]
    counts = {c: done.count(c) for c in dict.fromkeys(done)}
    return ", ".join(f"{c} ({n} cells)" for c, n in counts.items()) or "no finished cell yet"


def _base_entry(data: dict, task: str) -> dict:
    """The cell that also evaluated the untrained base (the held-out set is the same in every cell)."""
    return next((e for e in data["cells"].values() if e["task"] == task and e.get("base_score") is not None), {})


def claims_rows(data: dict) -> list[list[str]]:
    return [[claim, f"**{verdict}**", detail] for claim, verdict, detail in claims(data)]


def _cell_note(e: dict) -> str:
    if e["status"] == "pending":
        return (e.get("reason") or "").replace("|", "\\|")[:160]
    notes = []
    if e.get("stopped_reason"):
        notes.append("stopped: " + e["stopped_reason"][:80])
    if e.get("resumed"):
        notes.append("resumed from a checkpoint (peak memory: the resumed process)")
    return "; ".join(notes)
