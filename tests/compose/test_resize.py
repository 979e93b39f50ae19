"""resize_adapter and the spectrum: SVD re-factorisation at a lower rank, exact at full rank, energies monotone."""

import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.compose.spectrum import format_spectrum, layer_spectra
from lorakit.errors import ConfigError
from lorakit.state import lora_layers

from ..conftest import load, randomise_lora

ATOL = 1e-5


@pytest.fixture
def adapted(llama_dir):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=8, alpha=16, target_modules="all-linear", rank_pattern={"v_proj": 4}))
    randomise_lora(model)
    return model


def _deltas(model, name):
    with torch.no_grad():
        return {n: layer.adapters[name].delta_weight(layer) for n, layer in lora_layers(model) if name in layer.adapters}


def test_full_rank_is_exact_and_reports_no_loss(adapted, tokens):
    with torch.no_grad():
        before = adapted(tokens).logits
    deltas = _deltas(adapted, "default")
    report = lorakit.resize_adapter(adapted, "default", energy=1.0)
    for row in report:
        assert row.energy_kept == pytest.approx(1.0) and row.relative_error <= 1e-6
        assert row.new_rank <= row.old_rank
    for name, delta in _deltas(adapted, "default").items():
        torch.testing.assert_close(delta, deltas[name], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(adapted(tokens).logits, before, atol=5e-5, rtol=0)  # fp32 re-association only


def test_rank_k_is_the_best_rank_k_approximation(adapted, tmp_path, tokens):
    from peft import PeftModel

    deltas = _deltas(adapted, "default")
    report = {row.module: row for row in lorakit.resize_adapter(adapted, "default", rank=2)}
    for name, delta in _deltas(adapted, "default").items():
        U, S, Vh = torch.linalg.svd(deltas[name])
        torch.testing.assert_close(delta, (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-4)
        e = S**2
        assert report[name].energy_kept == pytest.approx(float(e[:2].sum() / e.sum()), rel=1e-4)
        assert report[name].relative_error == pytest.approx(float((e[2:].sum() / e.sum()).sqrt()), rel=1e-3)
    assert lorakit.active_adapters(adapted) == [("default", 1.0)]
    path = lorakit.save_adapter(adapted, tmp_path / "r2")
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 2
    theirs = PeftModel.from_pretrained(load(adapted.config._name_or_path), path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, adapted(tokens).logits, atol=ATOL, rtol=0)


def _set_spectrum(layer, adapter, singular_values, seed):
    """Give `adapter` on `layer` the change U·diag(S)·Vh with these singular values (orthonormal U and V)."""
    a = layer.adapters[adapter]
    r = len(singular_values)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(a.lora_B.shape[0], r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(a.lora_A.shape[1], r, generator=g))
    S = torch.tensor(singular_values) / a.scale
    with torch.no_grad():
        a.lora_A.copy_(V.T)
        a.lora_B.copy_(U * S)


def test_energy_picks_a_rank_per_layer(adapted):
    layers = dict(lora_layers(adapted))
    peaked, flat = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"
    _set_spectrum(layers[peaked], "default", [10.0, 1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05], seed=1)  # rank 1 keeps > 0.9
    _set_spectrum(layers[flat], "default", [1.0] * 8, seed=2)  # each direction 1/8 of the energy: 0.9 needs 8
    deltas = _deltas(adapted, "default")
    report = {row.module: row for row in lorakit.resize_adapter(adapted, "default", energy=0.9, new_name="small")}
    assert "default" in lorakit.list_adapters(adapted)  # kept beside the new one
    assert (report[peaked].new_rank, report[flat].new_rank) == (1, 8)
    assert report["model.layers.0.self_attn.v_proj"].old_rank == 4
    resized = _deltas(adapted, "small")
    for name, row in report.items():
        assert layers[name].adapters["small"].rank == row.new_rank
        S = torch.linalg.svdvals(deltas[name].double())
        kept = torch.cumsum(S**2, 0) / (S**2).sum()
        assert row.new_rank == int((kept < 0.9 - 1e-9).sum()) + 1  # the smallest rank reaching the target
        actual = 1 - float(((resized[name] - deltas[name]).double().norm() / deltas[name].double().norm()) ** 2)
        assert actual >= 0.9 - 1e-5 and row.energy_kept == pytest.approx(actual, abs=1e-5)


def test_rank_r_keeps_every_layer_exactly(adapted, tokens):
    """rank=8 on an adapter of ranks 8 and 4 (v_proj): full rank everywhere, v_proj keeps its 4."""
    deltas = _deltas(adapted, "default")
    report = {row.module: row for row in lorakit.resize_adapter(adapted, "default", rank=8)}
    assert {row.new_rank for name, row in report.items() if "v_proj" in name} == {4}
    assert {row.new_rank for name, row in report.items() if "v_proj" not in name} == {8}
    for name, delta in _deltas(adapted, "default").items():
        error = (delta - deltas[name]).double().norm() / deltas[name].double().norm()
        assert error <= 1e-6 and report[name].relative_error <= 1e-6


def test_a_rank_between_the_layers_ranks_caps_each_layer(adapted, tmp_path):
    src = lorakit.save_adapter(adapted, tmp_path / "src")
    report = {row.module: row for row in lorakit.resize_adapter(adapted, "default", rank=6)}
    assert all(row.new_rank == (4 if "v_proj" in name else 6) for name, row in report.items())
    from lorakit.compose.resize import resize_adapter_files

    rows = resize_adapter_files(src, tmp_path / "r6", rank=6)
    assert {row.module: row.new_rank for row in rows} == {name: row.new_rank for name, row in report.items()}
    config = json.loads((tmp_path / "r6" / "adapter_config.json").read_text())
    assert config["r"] == 6 and set(config["rank_pattern"].values()) == {4}


def test_refuses_a_larger_rank_and_bad_targets(adapted):
    with pytest.raises(ConfigError, match=r"rank 9: the adapter's largest rank is 8"):
        lorakit.resize_adapter(adapted, "default", rank=9)
    with pytest.raises(ConfigError, match="exactly one of rank"):
        lorakit.resize_adapter(adapted, "default", rank=2, energy=0.5)
    with pytest.raises(ConfigError, match=r"energy must be in \(0, 1\]"):
        lorakit.resize_adapter(adapted, "default", energy=1.5)


def test_files_resize_and_spectrum(adapted, llama_dir, tmp_path, tokens, capsys):
    from lorakit.cli import main

    src = lorakit.save_adapter(adapted, tmp_path / "src")
    assert main(["resize", str(src), "--rank", "3", "--out", str(tmp_path / "r3")]) == 0
    lorakit.resize_adapter(adapted, "default", rank=3)
    from_files = load(llama_dir)
    lorakit.load_adapter(from_files, tmp_path / "r3")
    with torch.no_grad():
        torch.testing.assert_close(from_files(tokens).logits, adapted(tokens).logits, atol=ATOL, rtol=0)

    spectra = layer_spectra(src)
    for module, S in spectra.items():
        kept = torch.cumsum(S**2, 0) / (S**2).sum()
        assert (kept[1:] >= kept[:-1] - 1e-7).all() and kept[-1] == pytest.approx(1.0)
    assert len(spectra["model.layers.0.self_attn.v_proj"]) == 4
    plot = tmp_path / "spectrum.png"
    capsys.readouterr()
    assert main(["inspect", str(src), "--spectrum", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "k=1" in out and "k=8" in out and "mean over layers" in out and plot.stat().st_size > 1000
    assert "100.0%" in format_spectrum(spectra)
    assert main(["resize", str(src), "--rank", "9", "--out", str(tmp_path / "bad")]) == 2
