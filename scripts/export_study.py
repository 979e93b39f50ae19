"""Refresh the study numbers that `lorakit recommend` cites: read the quality study's results directory
(bench/quality.py) and write src/lorakit/data/study.json (finished cells with their numbers, settings, date,
machine, model and data; the others with their state).

    python scripts/export_study.py --results /work/study-runs
    python scripts/export_study.py --results runs/quality --out /tmp/study.json

Read only: the study's own files (records, cells, metrics) are not changed, so it may run while the study does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from quality import CELLS  # noqa: E402  (the study's grid: cell names, tasks, flags and table tags)

from lorakit.recommend.export import STUDY_FILE, export_study, write_study_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, required=True, help="the study's results directory (bench/quality.py --results)")
    p.add_argument("--out", type=Path, default=STUDY_FILE, help=f"where to write (default {STUDY_FILE})")
    args = p.parse_args(argv)
    if not (args.results / "cells").is_dir() and not (args.results / "records").is_dir():
        raise SystemExit(f"{args.results} holds no study results (no cells/ or records/); pass bench/quality.py's --results")
    data = export_study(CELLS, args.results)
    write_study_data(data, args.out)
    states = [c["status"] for c in data["cells"].values()]
    print(f"wrote {args.out}: " + ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
