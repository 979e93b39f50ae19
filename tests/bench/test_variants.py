"""bench/variants.py: the --quick run reports every method's multiply-adds next to its step time, and the VeRA
count against the analytic ones; on single layers the count is exactly the fewest the analytic count allows."""

import sys
from pathlib import Path

import torch
from torch import nn

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import variants  # noqa: E402


def _rows(text: str, header: str) -> list[dict[str, str]]:
    """The rows, by column name, of the markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _macs(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * {"G": 1e9, "M": 1e6}[unit]


def test_quick_run_reports_flops_and_the_vera_count(capsys):
    assert variants.main(["--quick", "--methods", "lora,vera"]) == 0
    out = capsys.readouterr().out
    table = _rows(out, "| method | library |")
    flops = {f"{r['method']} {r['library']}": float(r["FLOPs ÷ lorakit LoRA"].rstrip("×")) for r in table}
    assert set(flops) == {"lora lorakit", "lora peft", "vera lorakit", "vera peft"}
    assert flops["lora lorakit"] == 1.0
    assert all(v > 0 for v in flops.values())
    assert flops["vera lorakit"] > 1.5  # r=256 against r=16 on 64-wide layers: far more products
    assert "floor (the frozen model, with input gradients)" in out

    vera = {r["count"].split(" (")[0]: r for r in _rows(out, "| count | VeRA | LoRA |")}
    assert set(vera) == {"row by row, as the formulas read", "fewest exact", "lorakit, counted", "PEFT, counted"}
    assert all(_macs(r["VeRA"]) > 0 and _macs(r["LoRA"]) > 0 and float(r["step ÷ LoRA step"].rstrip("×")) > 1
               for r in vera.values())
    fewest, ours = _macs(vera["fewest exact"]["VeRA"]), _macs(vera["lorakit, counted"]["VeRA"])
    assert ours >= fewest * 0.999  # nothing exact does fewer than the fewest (the M / G figures are rounded)


def _one_layer(config, inp, out, rows):
    """(counted multiply-adds of one forward + backward beyond the frozen layer's, the analytic Projection)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(inp, out, bias=False))
    model.requires_grad_(False)
    lorakit.inject(model, config)
    x = torch.randn(rows, inp, requires_grad=True)
    counted = variants.count_macs(lambda: model(x).sum().backward())
    return counted - 2 * rows * inp * out, variants.Projection(inp, out, dx=True, first_reader=True)


def test_one_vera_layer_counts_the_fewest_products():
    """512 × 512, 1024 rows: folded forward and dx, x·Aᵀ and dyᵀ·u: the fewest, counted to the multiply-add."""
    extra, p = _one_layer(lorakit.VeraConfig(r=256, target_modules=["q_proj"]), 512, 512, 1024)
    assert extra == variants.vera_macs(p, 1024, 256) > 0
    assert extra < variants.vera_macs(p, 1024, 256, row_by_row=True)


def test_one_lora_layer_counts_its_row_wise_term():
    """1376 → 512, 1024 rows: LoRA adds its forward term row by row (an in-place addmm_ that torch's own
    FlopCounterMode leaves out); with UNCOUNTED the count is the fewest, to the multiply-add."""
    extra, p = _one_layer(lorakit.LoraConfig(r=16, alpha=32, target_modules=["q_proj"]), 1376, 512, 1024)
    assert extra == variants.lora_macs(p, 1024, 16) > 0
