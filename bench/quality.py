"""The quality study: LoRA against full fine-tuning, rank / target / alpha / lr sweeps and the LoRA variants,
on the built-in model and data. Every cell is a real `lorakit train` run at the demo's settings with one
thing changed: its own process (peak RSS is per process), one thread, a fixed seed, the demo's held-out set.

    python bench/quality.py --results /work/study-runs           # run every missing cell, then write the doc
    python bench/quality.py --results /work/study-runs --render  # only collect what is done and write the doc
    python bench/quality.py --list                               # the cells and their state

Resumable: a finished cell (its metrics.json exists) is skipped; a killed one resumes from its last
checkpoint, or restarts when it had none. A cell whose flags `lorakit train` does not accept yet (a variant
still being built) is "pending" and skipped; running the study again later fills it in. Only one runner
may work on a results directory at a time (RESULTS/runner.pid).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import write_report  # noqa: E402


@dataclass(frozen=True)
class Cell:
    name: str  # its directory under RESULTS/cells
    flags: str  # what changes against the demo's settings (`lorakit train` flags)
    rows: dict = field(default_factory=dict)  # {table: x value or label} for every table the cell appears in
    task: str = "causal-lm"
    seed: int = 0
    base: bool = False  # also evaluate the untrained base (once per task is enough: same held-out set)

    def argv(self) -> list[str]:
        task = ["--task", self.task] if self.task != "causal-lm" else []
        return [*task, *shlex.split(self.flags), "--seed", str(self.seed), "--split-seed", "0"]


C, K = "causal-lm", "classify"
# Matched trainable parameters (SmolLM2-135M: hidden 576, k/v 192, MLP 1536; r parameters per rank and block:
# q 1152, k 768, v 768, o 1152, gate/up/down 2112 each): all linear r=8 is 81,408 per block, attention
# (q,k,v,o) r=21 and q,v r=42 are both 80,640 (-0.9%). Classification (q,v by default): q,v r=16 30,720,
# q,k,v,o r=8 30,720, all linear r=3 30,528 (-0.6%). α = 2r everywhere, so the scale α/r stays 2.
# Cells run in this order: the headline rows first, then the second task's, then the sweeps.
CELLS = [
    Cell("lora-r8-s0", "", {"headline": "LoRA r=8", "rank": 8, "alpha": 16, "lr": 1e-3, "targets": "all linear r=8", "method": "LoRA"}, base=True),
    Cell("lora-r8-s1", "", {"headline": "LoRA r=8", "method": "LoRA"}, seed=1),
    Cell("full-s0", "--method full --lr 1e-4", {"headline": "full FT", "full-lr": 1e-4, "method": "full FT"}),
    Cell("full-s1", "--method full --lr 1e-4", {"headline": "full FT", "method": "full FT"}, seed=1),
    Cell("cls-lora-r8-s0", "", {"cls-headline": "LoRA r=8 (q,v)", "cls-rank": 8}, task=K, base=True),
    Cell("cls-lora-r8-s1", "", {"cls-headline": "LoRA r=8 (q,v)"}, task=K, seed=1),
    Cell("cls-full-s0", "--method full --lr 1e-4", {"cls-headline": "full FT"}, task=K),
    Cell("cls-full-s1", "--method full --lr 1e-4", {"cls-headline": "full FT"}, task=K, seed=1),
    Cell("lora-r1", "--rank 1 --alpha 2", {"rank": 1}),
    Cell("lora-r2", "--rank 2 --alpha 4", {"rank": 2}),
    Cell("lora-r4", "--rank 4 --alpha 8", {"rank": 4}),
    Cell("lora-r16", "--rank 16 --alpha 32", {"rank": 16}),
    Cell("lora-r64", "--rank 64 --alpha 128", {"rank": 64, "rslora": "r=64 α=128 (α/r = 2)"}),
    Cell("lora-qv-r42", "--targets q_proj v_proj --rank 42 --alpha 84", {"targets": "q,v r=42"}),
    Cell("lora-qkvo-r21", "--targets q_proj k_proj v_proj o_proj --rank 21 --alpha 42", {"targets": "q,k,v,o r=21"}),
    Cell("lora-a1", "--alpha 1", {"alpha": 1}),
    Cell("lora-a8", "--alpha 8", {"alpha": 8}),
    Cell("lora-a128", "--alpha 128", {"alpha": 128}),
    Cell("lora-r64-a16", "--rank 64 --alpha 16", {"rslora": "r=64 α=16 (α/r = 0.25)"}),
    Cell("lora-r64-a16-rslora", "--rank 64 --alpha 16 --rslora", {"rslora": "r=64 α=16 rsLoRA (α/√r = 2)"}),
    Cell("lora-lr1e-4", "--lr 1e-4", {"lr": 1e-4}),
    Cell("lora-lr2e-4", "--lr 2e-4", {"lr": 2e-4}),
    Cell("full-lr1e-5", "--method full --lr 1e-5", {"full-lr": 1e-5}),
    Cell("full-lr1e-3", "--method full --lr 1e-3", {"full-lr": 1e-3}),
    Cell("cls-lora-r2", "--rank 2 --alpha 4", {"cls-rank": 2}, task=K),
    Cell("cls-lora-r32", "--rank 32 --alpha 64", {"cls-rank": 32}, task=K),
    Cell("cls-qv-r16", "--rank 16 --alpha 32", {"cls-targets": "q,v r=16"}, task=K),
    Cell("cls-qkvo-r8", "--targets q_proj k_proj v_proj o_proj", {"cls-targets": "q,k,v,o r=8"}, task=K),
    Cell("cls-all-r3", "--targets all-linear --rank 3 --alpha 6", {"cls-targets": "all linear r=3"}, task=K),
    # Variants and QLoRA at the demo's settings.
    Cell("dora-r8", "--method dora", {"method": "DoRA", "dora": "DoRA r=8"}),
    Cell("dora-r2", "--method dora --rank 2 --alpha 4", {"dora": "DoRA r=2"}),
    Cell("vera-r256", "--method vera --rank 256", {"method": "VeRA"}),
    # VeRA and AdaLoRA train few or slowly-growing parameters: at LoRA's lr they barely move in 60 steps
    # (bench/variants.py), so each also gets the learning rate its own tuning found.
    Cell("vera-r256-lr3e-2", "--method vera --rank 256 --lr 3e-2", {"method": "VeRA (lr 3e-2)"}),
    Cell("adalora", "--method adalora", {"method": "AdaLoRA"}),
    Cell("adalora-lr5e-3", "--method adalora --lr 5e-3", {"method": "AdaLoRA (lr 5e-3)"}),
    Cell("pissa", "--init pissa", {"method": "PiSSA"}),
    Cell("qlora", "--quantize nf4", {"method": "QLoRA"}),
    Cell("qlora-loftq", "--quantize nf4 --init loftq", {"method": "QLoRA + LoftQ"}),
]

LARGE_FILE = 64 * 2**20  # after a cell finishes, files above this (full-model weights) are deleted


def cell_dir(results: Path, cell: Cell) -> Path:
    return results / "cells" / cell.name


def is_done(results: Path, cell: Cell) -> bool:
    return (cell_dir(results, cell) / "metrics.json").exists()


def train_argv(cell: Cell, results: Path, extra: list[str]) -> list[str]:
    """`lorakit train` arguments of a cell: the common ones (--threads 1, the study's config file, `extra`),
    then the cell's own flags, so a cell's flag wins over a common one."""
    config = results / ("with_base.json" if cell.base else "no_base.json")
    return ["--threads", "1", "--config", str(config), *extra, *cell.argv(), "--out", str(cell_dir(results, cell))]


def refusal(argv: list[str]) -> str | None:
    """Why `lorakit train` would refuse these arguments before loading anything (None: it accepts them)."""
    from lorakit.cli import build_parser
    from lorakit.errors import LorakitError
    from lorakit.train.cli import config_from_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            config_from_args(build_parser().parse_args(["train", *argv]))
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        return lines[-1] if lines else "argument error"
    except LorakitError as e:
        return str(e)
    return None


def run_cell(cell: Cell, results: Path, extra: list[str], keep_weights: bool, say=print) -> str:
    """Run (or resume) one cell in its own process; returns its state: done, pending or failed."""
    out = cell_dir(results, cell)
    argv = train_argv(cell, results, extra)
    why = refusal(argv)
    if why is not None:
        _write_record(results, cell, {"status": "pending", "reason": why, "argv": argv})
        say(f"[{cell.name}] pending: lorakit train does not accept {cell.flags!r} yet ({why})")
        return "pending"
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
    if out.exists() and not resume:
        shutil.rmtree(out)  # killed before its first checkpoint: start again
    log = results / "logs" / f"{cell.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lorakit", "train", *argv, *(["--resume"] if resume else [])]
    say(f"[{cell.name}] {'resuming' if resume else 'running'}: lorakit train {shlex.join(command[4:])}")
    started = time.time()
    with open(log, "a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        f.flush()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        code = proc.wait()
    record = {"argv": argv, "returncode": code, "resumed": resume, "started": started, "seconds": time.time() - started,
              "commit": code_version()}
    if (out / "metrics.json").exists():
        if not keep_weights:
            _prune(out)
        _write_record(results, cell, {**_read_record(results, cell), **record, "status": "done"})
        say(f"[{cell.name}] done in {record['seconds'] / 60:.1f} min")
        return "done"
    _write_record(results, cell, {**record, "status": "failed"})
    say(f"[{cell.name}] failed (exit code {code}); see {log}")
    return "failed"


def run_study(cells: list[Cell], results: Path, doc: Path, extra: list[str] = (), keep_weights: bool = False,
              say=print, report_cells: list[Cell] | None = None) -> dict[str, str]:
    """Run every cell that is not done (each once), rendering the doc after each; returns {name: state}.
    `extra`: flags for every cell (the tests use a tiny model); `report_cells`: what the doc shows (default `cells`)."""
    results.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise SystemExit(f"cell names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
    _write_study_configs(results)
    states = {}
    with _lock(results):
        for cell in cells:
            if is_done(results, cell):
                states[cell.name] = "done"
                continue
            states[cell.name] = run_cell(cell, results, list(extra), keep_weights, say)
            _report(report_cells or cells, results, doc, say)
    _report(report_cells or cells, results, doc, say)
    return states


def _report(cells: list[Cell], results: Path, doc: Path, say) -> None:
    try:
        write_report(cells, results, doc)
    except Exception as e:  # a report bug must not stop hours of runs; --render retries it
        say(f"the report could not be written ({type(e).__name__}: {e}); the cells go on")


def code_version() -> str | None:
    """The last commit that changed src/ in the checkout this runner runs from (the lorakit the cells run,
    whatever happened in bench/ since); "+changes" when src/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", "src"], capture_output=True, text=True,
                                cwd=root, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=root,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+changes" if dirty else "")) or None


def _write_study_configs(results: Path) -> None:
    # The demo evaluates the base model too; the held-out set is the same in every cell, so once per task will do.
    for name, compare in (("with_base.json", True), ("no_base.json", False)):
        path = results / name
        if not path.exists():
            path.write_text(json.dumps({"compare_base": compare}) + "\n")


def _record_path(results: Path, cell: Cell) -> Path:
    return results / "records" / f"{cell.name}.json"


def _read_record(results: Path, cell: Cell) -> dict:
    path = _record_path(results, cell)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_record(results: Path, cell: Cell, record: dict) -> None:
    path = _record_path(results, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def _prune(out: Path) -> None:
    """Keep the evidence (metrics, plot, config, adapter), drop checkpoints and full-model weights."""
    for sub in ("checkpoints", "best"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for f in out.iterdir():
        if f.is_file() and f.stat().st_size > LARGE_FILE:
            f.unlink()


def _die_with_parent() -> None:
    """A cell dies with its runner (Linux), so a killed runner leaves no orphan writing into RESULTS."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _lock(results: Path):
    pid_file = results / "runner.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
            raise SystemExit(f"another study runner (pid {pid}) works on {results}; wait for it or stop it first")
    pid_file.write_text(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("runs/quality"), help="where the cells run (default runs/quality)")
    p.add_argument("--doc", type=Path, default=Path("docs/quality.md"),
                   help="the report; its JSON and plots go beside it (default docs/quality.md)")
    p.add_argument("--only", nargs="+", help="run only these cells (names as in --list)")
    p.add_argument("--render", action="store_true", help="only collect finished cells and write the report")
    p.add_argument("--list", action="store_true", help="list the cells and their state")
    p.add_argument("--keep-weights", action="store_true", help="keep checkpoints and full-model weights of finished cells")
    args = p.parse_args(argv)
    # `kill PID` unwinds like Ctrl-C: the lock is released, and the running cell dies with the runner (its
    # checkpoints stay, so the next run resumes it).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cells = [c for c in CELLS if not args.only or c.name in args.only]
    if args.only and len(cells) != len(args.only):
        raise SystemExit(f"unknown cell(s): {sorted(set(args.only) - {c.name for c in CELLS})}")
    if args.list:
        for c in cells:
            state = "done" if is_done(args.results, c) else _read_record(args.results, c).get("status", "not run")
            print(f"{c.name:22s} {state:8s} {c.task:9s} seed {c.seed}  {c.flags}")
        return 0
    if args.render:
        write_report(CELLS, args.results, args.doc)
        return 0
    states = run_study(cells, args.results, args.doc, keep_weights=args.keep_weights, report_cells=CELLS)
    print({s: sum(v == s for v in states.values()) for s in ("done", "pending", "failed")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
