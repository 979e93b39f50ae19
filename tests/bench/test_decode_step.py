"""bench/decode_step.py: the --quick run times every per-row path and the engine, and leaves the paths' limits as
they were."""

import re
import sys
from pathlib import Path

from lorakit import rows

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import decode_step  # noqa: E402


def test_quick_run_reports_each_path_and_the_engine(capsys):
    limits = (rows.MAX_RUNS, rows.STACK_MAX_RANK)
    assert decode_step.main(["--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
             if line.startswith("| ") and line.split("|")[3].strip()[:1].isdigit()}
    assert set(table) == {"base", "grouped by adapter", "interleaved, side by side", "interleaved, slots gathered"}
    assert table["base"] == 1.0 and all(v > 0 for v in table.values())
    ratio = re.search(r"Engine \(16 requests.*ratio (\d+\.\d+)", out)
    assert ratio and float(ratio.group(1)) > 0
    assert (rows.MAX_RUNS, rows.STACK_MAX_RANK) == limits
