"""A recommendation as text: the settings with their reasons, the memory verdict, how to run it, and where every
cited measurement comes from."""

from __future__ import annotations

import textwrap

WIDTH = 118


def format_recommendation(rec, data: str | None = None) -> str:
    """`rec`: a lorakit.recommend.Recommendation (not imported: recommender.py imports this module to format itself)."""
    plan = rec.memory.plan
    asked = [rec.task, f"{plan.base.total:,} parameters ({plan.model_type})",
             f"{rec.examples:,} examples" if rec.examples else "examples not given",
             f"{rec.memory_gb:g} GiB" if rec.memory_gb is not None else "no memory budget", f"priority {rec.priority}"]
    lines = [f"recommendation for {rec.model}: " + ", ".join(asked), ""]
    if rec.memory_note:
        lines += _wrap("NOTE: " + rec.memory_note, "") + [""]
    for s in rec.settings:
        value = ", ".join(map(str, s.value)) if isinstance(s.value, list) else s.value
        lines.append(f"{s.name}: {value}   [{s.source}]")
        lines += _wrap(s.reason, "    ")
    peak = rec.memory.peak
    lines += ["", f"memory plan at these settings: {_human(peak)} peak for {rec.memory.rung.describe()} "
                  f"(batch {rec.memory.micro_batch} x {plan.seq} tokens, {plan.device})"
                  + (f", {rec.memory_gb:g} GiB asked" if rec.memory_gb is not None else "")]
    if rec.lora is not None:
        c = rec.lora
        targets = c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules)
        lines.append(f"LoraConfig(r={c.r}, alpha={c.alpha:g}, dropout={c.dropout:g}, target_modules={targets!r}"
                     + (f", layers_to_transform={_blocks(c.layers_to_transform)}" if c.layers_to_transform else "") + ")")
    for note in rec.notes:
        lines += _wrap("note: " + note, "")
    lines += ["", "run it:", "  " + rec.command(data), "  (or: lorakit recommend ... --write run.yaml, then lorakit train "
              "--config run.yaml" + ("" if rec.bundled or data else " --data DATA.jsonl") + ")"]
    if rec.study.cited:
        where = rec.study.path.name if rec.study.path else "study data"
        lines += ["", f"study cells cited (bench/quality.py; lorakit/data/{where}, exported {rec.study.exported}):"]
        for line in rec.study.provenance():
            lines += _wrap(line, "    ", first="  ")
    lines.append("sources: [study] measured by lorakit's study; [plan] lorakit's memory plan; [prior] not measured "
                 "here, stated as an assumption")
    return "\n".join(lines)


def _blocks(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"list(range({layers[0]}, {layers[-1] + 1}))" if contiguous and len(layers) > 3 else repr(layers)


def _wrap(text: str, indent: str, first: str | None = None) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent if first is None else first, subsequent_indent=indent + "  ",
                         break_on_hyphens=False)


def _human(n: int) -> str:
    from ..plan.report import human

    return human(n)
