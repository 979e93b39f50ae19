"""`lorakit diagnose PATH`: the findings of `lorakit.diagnose` for a lorakit run or a Hugging Face Trainer run."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="find problems in a training run (lorakit or Hugging Face Trainer)",
                       description="Check a run's history for a loss that does not fall, spikes, NaN, exploding "
                                   "gradients and overfitting, and its adapter for NaN/Inf, exploding norms and "
                                   "full-rank updates. Exit code 0: nothing found; 1: findings; 2: unreadable input.")
    p.add_argument("run", help="a lorakit run directory or metrics.json, or a Trainer output_dir or trainer_state.json")
    p.add_argument("--adapter", help="adapter (or model) directory to scan (default: the one beside the history)")
    p.add_argument("--base", help="base model directory: judge the adapter's update against the pretrained weights")
    p.set_defaults(func=run)


def run(args) -> int:
    from .diagnostics import diagnose_run
    from .history import read_history

    history = read_history(args.run)
    weights = args.adapter or history.weights_dir
    model = _adapted_model(args.base, weights) if args.base and weights else weights
    print(history.describe() + (f"; weights scanned: {weights}" if weights else "; no weights found to scan"))
    findings = diagnose_run(history, model)
    for f in findings:
        print(f"- [{f.kind}] {f.message}")
    if not findings:
        print("no problems found")
    return 1 if findings else 0


def _adapted_model(base: str, adapter):
    from ..hf import load_base_model
    from ..io import load_adapter, read_adapter_config

    config = read_adapter_config(adapter)
    model = load_base_model(base, config.task_type or "CAUSAL_LM")
    load_adapter(model, adapter)
    return model
