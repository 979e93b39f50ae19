"""torchrun data parallelism on CPU (gloo): two processes reach what one process reaches on the same global batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .helpers import letter_rows, write_jsonl


def test_two_processes_match_one(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", letter_rows(80))
    common = ["--base", str(lm_dir), "--data", str(data), "--max-steps", "5", "--lr", "3e-3", "--targets", "all-linear",
              "--eval-fraction", "0.2", "--seed", "2", "--save-every", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "lorakit", "train", *common, "--batch-size", "8",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lorakit", "train", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for (s1, l1), (s2, l2) in zip(ma["train_loss"], mb["train_loss"]):
        assert s1 == s2 and abs(l1 - l2) < 1e-4
    assert mb["tokens"] == ma["tokens"]  # every row of the global batch was seen once
