"""What every run measures about its own cost: peak memory and time per optimizer step."""

from __future__ import annotations

import statistics
import sys

import torch


def peak_memory(device: torch.device) -> dict[str, object]:
    """Peak memory of this process: CUDA's peak allocation on a GPU, else the peak resident set size.

    ru_maxrss is the maximum over the whole process lifetime (loading and evaluation included) and
    cannot be reset, so runs to compare must each be their own process (bench/quality.py does that)."""
    rss = _peak_rss()
    found: dict[str, object] = {"peak_rss_bytes": rss}
    if device.type == "cuda":
        found.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)),
                     peak_memory_measure="torch.cuda.max_memory_allocated")
    elif rss is not None:
        found.update(peak_memory_bytes=rss, peak_memory_measure="ru_maxrss: peak RSS of the process")
    return found


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def step_times(step_seconds: list[float], step_cpu_seconds: list[float] = ()) -> dict[str, float | None]:
    """Mean and median seconds per optimizer step (evaluation and checkpointing are not inside a step), in
    wall-clock time and in CPU time: on a machine shared with other jobs a step also waits for a core, which
    moves wall-clock time a lot and CPU time little (with --threads 1, CPU time is the step's own work)."""
    found: dict[str, float | None] = {}
    for name, values in (("step_seconds", step_seconds), ("step_cpu_seconds", step_cpu_seconds)):
        found[f"{name}_mean"] = round(statistics.fmean(values), 4) if values else None
        found[f"{name}_median"] = round(statistics.median(values), 4) if values else None
    return found


def cost_line(summary: dict) -> str:
    """One line for the end of a run: trainable parameters, step time, peak memory."""
    share = 100 * summary["trainable_params"] / max(summary["total_params"], 1)
    parts = [f"trainable {summary['trainable_params']:,} of {summary['total_params']:,} ({share:.3g}%)"]
    if summary.get("step_seconds_mean") is not None:
        parts.append(f"step {summary['step_seconds_mean']:.3g} s mean, {summary['step_seconds_median']:.3g} s median"
                     f" ({summary['step_cpu_seconds_median']:.3g} s CPU)")
    if summary.get("peak_memory_bytes") is not None:
        kind = "GPU" if "cuda" in summary["peak_memory_measure"] else "RSS"
        parts.append(f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({kind})")
    return " · ".join(parts)
