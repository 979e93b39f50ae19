"""Every command on a GPU, against the same command on the CPU: training (fp32 and bf16 autocast), resuming across
devices, generate, serving a mixed batch, merge, the demo, and library functions on a CUDA model.

Marked `cuda`: skipped, with the reason, where torch finds no GPU (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, MixtureConfig
from lorakit.device import resolve_device
from lorakit.errors import DeviceError
from lorakit.state import lora_layers

from .conftest import load, randomise_lora
from .train.helpers import letter_rows, write_jsonl

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda", 0)


@pytest.fixture
def letters(tmp_path):
    return write_jsonl(tmp_path / "letters.jsonl", letter_rows(64))


def config(base, data, out, **kw):
    from lorakit.train.config import TrainConfig

    values = {"base": str(base), "data": str(data), "out": str(out), "max_steps": 6, "batch_size": 8, "lr": 3e-3,
              "targets": "all-linear", "eval_fraction": 0.2, "seed": 1, "max_eval": 16}
    return TrainConfig(**{**values, **kw})


def close_losses(a, b, tol):
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < tol, (a, b)


def test_names_and_counts_of_the_real_gpus():
    count = torch.cuda.device_count()
    assert resolve_device("auto") == torch.device("cpu")  # the suite sets LORAKIT_DEVICE=cpu
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(DeviceError, match=f"this machine has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_training_on_the_gpu_matches_the_cpu(lm_dir, letters, tmp_path):
    from lorakit.train.loop import train

    cpu = train(config(lm_dir, letters, tmp_path / "cpu", device="cpu"))
    gpu = train(config(lm_dir, letters, tmp_path / "gpu", device="cuda"))
    assert {p.device for p in gpu.model.parameters()} == {GPU}
    close_losses(cpu.progress.train_loss, gpu.progress.train_loss, 1e-4)
    a, b = load_file(tmp_path / "cpu" / "adapter_model.safetensors"), load_file(tmp_path / "gpu" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    metrics = json.loads((tmp_path / "gpu" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda:0 (") and metrics["peak_memory_measure"] == "torch.cuda.max_memory_allocated"
    assert abs(metrics["final"]["eval_loss"] - cpu.metrics["eval_loss"]) < 1e-3


def test_bf16_autocast_on_the_gpu(lm_dir, letters, tmp_path):
    from lorakit.train.loop import train

    fp32 = train(config(lm_dir, letters, tmp_path / "fp32", device="cuda"))
    bf16 = train(config(lm_dir, letters, tmp_path / "bf16", device="cuda", precision="bf16"))
    q = bf16.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.adapters["default"].lora_A.dtype == torch.float32
    close_losses(fp32.progress.train_loss, bf16.progress.train_loss, 5e-2)  # bf16's 8-bit mantissa, not a bug


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_checkpoint_resumes_on_the_other_device(lm_dir, letters, tmp_path, first, then):
    from lorakit.train.loop import train

    run = tmp_path / "run"
    straight = train(config(lm_dir, letters, run, device=first, save_every=3))
    rng = torch.load(run / "checkpoints" / "step-000003" / "rng.pt", weights_only=True, map_location="cpu")
    assert ("cuda" in rng) == (first == "cuda")  # a CPU run does not start CUDA to save its generator
    shutil.rmtree(run / "checkpoints" / "step-000006")
    resumed = train(config(lm_dir, letters, run, device=then, save_every=3, resume=True))
    assert {p.device.type for p in resumed.model.parameters()} == {then}
    assert resumed.progress.train_loss[:3] == straight.progress.train_loss[:3]
    close_losses(straight.progress.train_loss, resumed.progress.train_loss, 1e-4)  # moments restored, on `then`


@pytest.fixture
def two_adapters(lm_dir, tmp_path):
    paths = []
    for seed, targets in enumerate(["all-linear", ["q_proj", "v_proj"]]):
        model = load(lm_dir)
        lorakit.inject(model, LoraConfig(r=4 + 4 * seed, target_modules=targets))
        randomise_lora(model, std=0.5, seed=seed)
        paths.append(str(lorakit.save_adapter(model, tmp_path / f"a{seed}")))
    return paths


def test_generate_on_the_gpu_matches_the_cpu(lm_dir, two_adapters):
    from lorakit.train.generate_cli import generate

    prompts = ["w: a\nc:", "w: bb\nc:", "w: c\nc:"]
    adapters = [two_adapters[0], two_adapters[1], "base"]
    cpu = generate(str(lm_dir), adapters, prompts, max_new_tokens=8, device="cpu")
    assert generate(str(lm_dir), adapters, prompts, max_new_tokens=8, device="cuda") == cpu
    assert len(set(cpu)) > 1


def test_serving_a_mixed_batch_on_the_gpu(lm_dir, two_adapters):
    import threading

    from fastapi.testclient import TestClient

    from lorakit.serve.engine import Job, SamplingParams
    from lorakit.serve.server import create_app

    asks = [("a0", "w: a\nc:", 0.0), ("a1", "w: bb\nc:", 0.0), (None, "w: c\nc:", 0.0), ("a0", "w: d\nc:", 1.0),
            ("a1", "w: e\nc:", 1.0)]

    def answers(device):
        app = create_app(lm_dir, adapters={"a0": two_adapters[0], "a1": two_adapters[1]}, max_batch=8, device=device)
        state = app.state.lorakit
        with TestClient(app) as client:
            http = client.post("/v1/completions", json={"model": "a1", "prompt": "w: a\nc:", "max_tokens": 6,
                                                        "temperature": 0}).json()["choices"][0]["text"]
            texts, done = [""] * len(asks), threading.Semaphore(0)

            def sink(i):
                def on_event(event):
                    texts[i] += event.text
                    if event.finish_reason:
                        done.release()
                return on_event

            # Queued together, so the engine admits all of them before its next decode step: one mixed batch.
            state.engine.submit_many([Job(state.tokenizer(p)["input_ids"], SamplingParams(max_tokens=8, temperature=t,
                                                                                          seed=7), sink(i), a)
                                      for i, (a, p, t) in enumerate(asks)])
            assert all(done.acquire(timeout=60) for _ in asks)
            assert {p.device.type for p in state.engine.model.parameters()} == {torch.device(device).type}
            return http, texts, state.engine.stats.max_batch_seen

    cpu = answers("cpu")
    gpu = answers("cuda")
    assert gpu[:2] == cpu[:2] and gpu[2] == len(asks)  # the seeded samples too: drawn on the CPU generator either way


def test_merge_on_the_gpu(llama_dir, tmp_path, tokens):
    from lorakit.merge_cli import merge_to_directory

    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomise_lora(model)
    adapter = lorakit.save_adapter(model, tmp_path / "a")
    model.to(GPU)
    ids = tokens.to(GPU)
    q = model.model.layers[0].self_attn.q_proj.base_layer
    before, original = model(ids).logits, q.weight.detach().clone()
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=0)
    lorakit.unmerge(model)
    assert torch.equal(q.weight, original) and q.weight.device == GPU
    for device in ("cpu", "cuda"):
        merge_to_directory(str(llama_dir), str(adapter), str(tmp_path / device), device=device)
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_library_functions_keep_a_cuda_model_on_its_gpu(llama, tmp_path, tokens):
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    randomise_lora(llama)
    saved = lorakit.save_adapter(llama, tmp_path / "a")
    model = lorakit.unload(llama).to(GPU)
    ids = tokens.to(GPU)
    lorakit.load_adapter(model, saved, adapter="a")
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"), adapter="b")  # dare: same layers, ranks
    randomise_lora(model, seed=3)
    state = torch.cuda.get_rng_state(GPU)
    lorakit.combine_adapters(model, {"a": 1.0, "b": 0.5}, method="dare_linear", density=0.5, name="dare")
    assert torch.equal(torch.cuda.get_rng_state(GPU), state)  # the caller's GPU generator is left as it was
    lorakit.resize_adapter(model, "a", rank=2, new_name="small")
    lorakit.add_mixture(model, MixtureConfig(experts={"x": str(saved), "y": str(saved)}), name="mix")
    with torch.no_grad():
        assert model(ids).logits.device == GPU  # the mixture
        lorakit.delete_adapter(model, "mix")
        mixed = model(ids, adapter_names=["small", "dare"]).logits
        for row, name in enumerate(["small", "dare"]):
            lorakit.set_active(model, name)
            torch.testing.assert_close(mixed[row], model(ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-4)
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for _, layer in lora_layers(model) if layer.row_stack is not None
                for t in (layer.row_stack.A, layer.row_stack.B)]
    assert {t.device for t in tensors} == {GPU}


def test_demo_on_the_gpu(cli):
    code, out, _ = cli("demo", "--steps", "20", "--device", "cuda")
    assert code == 0 and "device: cuda:0" in out and "OK: round trip" in out
