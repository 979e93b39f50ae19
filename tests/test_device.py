"""`--device`: one resolver for every command, clear errors for a GPU that is not there, library functions that keep
a model where it is (checked on the meta device), and checkpoints written on a GPU that resume on the CPU."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch

import lorakit
from lorakit import LoraConfig, MixtureConfig
from lorakit.device import model_device, resolve_device
from lorakit.errors import DeviceError
from lorakit.serve.store import AdapterStore
from lorakit.state import lora_layers
from lorakit.train.distributed import init_world

from .conftest import llama_config, randomise_lora
from .train.helpers import letter_rows, write_jsonl


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as a CPU-only PyTorch build sees it (also where the tests run on a GPU machine)."""
    monkeypatch.delenv("LORAKIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two GPUs, as far as the resolver asks (nothing runs on them)."""
    monkeypatch.delenv("LORAKIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")


def test_auto_cpu_and_cuda_resolve_to_devices(no_gpu, monkeypatch):
    assert resolve_device("auto") == resolve_device(None) == resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == resolve_device("cpu:0") == torch.device("cpu")
    monkeypatch.setenv("LORAKIT_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_gpus_by_index_and_the_count_when_there_are_fewer(two_gpus, monkeypatch):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda:7")
    assert str(e.value) == ("device 'cuda:7': this machine has 2 CUDA device(s) (cuda:0 Fake GPU, cuda:1 Fake GPU); "
                            "pass cuda:0 to cuda:1, or cuda for the current one")
    monkeypatch.setenv("LORAKIT_DEVICE", "cuda:3")
    with pytest.raises(DeviceError, match=r"^\$LORAKIT_DEVICE \(what --device auto means here\): device 'cuda:3'"):
        resolve_device("auto")


def test_no_gpu_says_what_was_found_and_the_fix(no_gpu, monkeypatch):
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda")
    message = str(e.value)
    assert message.startswith(f"device 'cuda': no CUDA GPU is available: this PyTorch ({torch.__version__}) is a "
                              "CPU-only build. Pass --device cpu (or auto")
    assert "install a CUDA build of PyTorch" in message
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match=r"built for CUDA 12.4, CUDA_VISIBLE_DEVICES=''\) finds none; check the "
                                          "driver with nvidia-smi"):
        resolve_device("cuda:0")
    for bad in ("gpu", "cuda:x", "cpu:1", "mps", ""):
        with pytest.raises(DeviceError, match="is not one lorakit runs on; pass auto, cpu, cuda, cuda:N"):
            resolve_device(bad)


@pytest.mark.parametrize("command", [
    ["train", "--base", "B", "--data", "D.jsonl"],
    ["generate", "--base", "B", "--prompt", "hi"],
    ["serve", "--base", "B"],
    ["merge", "--base", "B", "--adapter", "A", "--out", "O"],
    ["demo"],
])
def test_every_command_says_it_in_one_line_with_exit_code_2(cli, command, no_gpu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is looked for or written before the device is checked
    code, out, err = cli(*command, "--device", "cuda")
    assert code == 2 and out == ""
    assert err.startswith(f"lorakit {command[0]}: error: device 'cuda': no CUDA GPU is available") and err.count("\n") == 1
    code, _, err = cli(*command, "--device", "gpu")
    assert code == 2 and "'gpu' is not one lorakit runs on" in err
    assert not any(tmp_path.iterdir())


def test_cuda_index_beyond_the_count_names_the_count(cli, two_gpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("generate", "--base", "B", "--prompt", "hi", "--device", "cuda:7")
    assert code == 2 and "this machine has 2 CUDA device(s)" in err


def test_a_world_of_one_uses_the_chosen_device_and_torchrun_one_gpu_per_rank(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert init_world("cpu").device == torch.device("cpu") and init_world("auto").size == 1
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        init_world("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs, three processes (no group is joined)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match="under torchrun each process uses the GPU of its local rank"):
        init_world("cuda:1")
    with pytest.raises(DeviceError, match="device 'cuda:2': this machine has 2 CUDA device"):
        init_world("cuda")


def test_train_config_checks_the_spelling_not_the_machine():
    from lorakit.train.config import TrainConfig

    assert TrainConfig(device="cuda:3").device == "cuda:3"  # a config written for another machine
    with pytest.raises(DeviceError, match="'gpu0' is not one lorakit runs on"):
        TrainConfig(device="gpu0")


# --- library functions keep a model where it is -------------------------------------------------------------


def test_library_functions_keep_a_model_where_it_is(llama, tmp_path):
    """Every tensor lorakit adds goes beside the layer's weights, in its dtype rules (fp32 factors on a bf16 base).
    On the meta device anything made on the CPU by mistake fails or shows up; CUDA tests check the same on a GPU."""
    from transformers import LlamaForCausalLM

    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    randomise_lora(llama)
    saved = lorakit.save_adapter(llama, tmp_path / "a")  # written from the CPU
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()
    lorakit.load_adapter(model, saved, adapter="a")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter="b")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["o_proj"], init="pissa"), adapter="p")  # moves part of W0
    lorakit.delete_adapter(model, "p")  # ... and gives it back
    lorakit.combine_adapters(model, {"a": 1.0, "b": -0.5}, method="cat", name="cat")
    lorakit.combine_adapters(model, {"a": 1.0, "b": 0.5}, method="svd", name="svd", rank=2)
    store = AdapterStore(model)
    store.register("served", saved)
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    with torch.no_grad(), store.rows(["served", None]):
        assert model(ids).logits.device.type == "meta"  # per-row stacks
    with torch.no_grad():
        assert model(ids, adapter_names=["a", "svd"]).logits.device.type == "meta"
        lorakit.add_mixture(model, MixtureConfig(experts={"x": str(saved), "y": str(saved)}), name="mix")
        assert model(ids).logits.device.type == "meta"  # the routers and their stacked experts
        lorakit.set_active(model, "a")
        lorakit.merge(model)
        assert model(ids).logits.device.type == "meta"
        lorakit.unmerge(model)
    tensors = [*model.parameters(), *model.buffers()]
    stacks = [layer.row_stack for _, layer in lora_layers(model) if layer.row_stack is not None]  # built above
    assert stacks
    tensors += [t for stack in stacks for t in (stack.A, stack.B)]
    assert {t.device.type for t in tensors} == {"meta"}
    adapter_dtypes = {p.dtype for name, p in model.named_parameters() if "adapters." in name}
    assert adapter_dtypes == {torch.float32}  # as PEFT: fp32 factors (and routers) on a half-precision base
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert model_device(model) == torch.device("meta")


# --- checkpoints move between machines ------------------------------------------------------------------------


def as_if_saved_on_gpu(path):
    """Rewrite a torch.save file so that its tensors say they were saved from cuda:0, as a GPU run's are
    (torch.load without map_location then fails on a machine without CUDA)."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pickled = next(n for n in entries if n.endswith("/data.pkl"))
    cpu, gpu = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # the storages' location strings (protocol 2)
    assert cpu in entries[pickled]
    entries[pickled] = entries[pickled].replace(cpu, gpu)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)


def test_a_gpu_checkpoint_resumes_on_the_cpu(lm_dir, tmp_path):
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", letter_rows(48))

    def config(out, steps, **kw):
        return TrainConfig(base=str(lm_dir), data=str(data), out=str(out), max_steps=steps, batch_size=4, lr=3e-3,
                           targets=["q_proj", "v_proj"], eval_fraction=0.2, seed=1, dropout=0.1, max_eval=8,
                           exact_match=False, device="cpu", **kw)

    straight = train(config(tmp_path / "run", 4, save_every=2))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")  # as if it had stopped after step 2
    step = tmp_path / "run" / "checkpoints" / "step-000002"
    rng = torch.load(step / "rng.pt", weights_only=True)
    torch.save({**rng, "cuda": torch.zeros(2, 16, dtype=torch.uint8)}, step / "rng.pt")  # two GPUs' generators
    for name in ("optimizer.pt", "rng.pt"):
        as_if_saved_on_gpu(step / name)
    resumed = train(config(tmp_path / "run", 4, save_every=2, resume=True))
    assert resumed.progress.train_loss == straight.progress.train_loss  # bit-identical: RNG and moments restored
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["device"] == "cpu"


def test_the_server_runs_a_given_model_where_it_is():
    from transformers import LlamaForCausalLM

    from lorakit.errors import ConfigError
    from lorakit.serve.server import create_app

    from .conftest import tiny_tokenizer

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config())
    with pytest.raises(ConfigError, match=r"create_app\(model, device='cpu'\): the model is on meta; move it first"):
        create_app(model, tokenizer=tiny_tokenizer(), device="cpu")
