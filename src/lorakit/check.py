"""`lorakit check`: can a given engine (vLLM, LoRAX, PEFT, lorakit) serve this adapter, and if not, why not; with a
servable copy written where a conversion exists. Conversions live in a small registry (`CONVERSIONS`); rank padding
and PEFT's spellings are defined here, AdaLoRA → LoRA and PiSSA/OLoRA → plain LoRA plug in from convert.py (which
imports this module, not the other way round).

Only the config and the weights' header are read to check; a conversion reads the tensors.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PEFT_LORA_KEYS, PEFT_MATH_KEYS
from .errors import BaseModelError, ConfigError, LorakitError
from .files import atomic_write, atomic_write_json
from .compose.mixture import (
    adapter_and_mixture_dirs,
    is_mixture_dir,
    mixture_config,
    read_mixture_config,
    read_router_header,
)
from .io import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _read_config_json,
    canonical_key,
    check_adapter_files,
    read_adapter_config,
    read_adapter_tensors,
    read_tensor_header,
    split_factor_key,
)
from .matching import logical_modules
from .servable import refusals, registry_dirs

ENGINES = ("vllm", "lorax", "peft", "lorakit")
# vLLM's --max-lora-rank accepts these; an adapter of rank r needs a server started with a choice >= r.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Modules the engines can put LoRA on in the common decoder families (their per-architecture tables agree on
# these); the embedding and the head are the only modules they take trained copies of.
SERVED_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                  "gate_up_proj", "dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj",
                  "c_fc", "fc1", "fc2", "out_proj", "wqkv", "wo", "w1", "w2", "w3", "embed_tokens", "lm_head"}
EMBEDDINGS_AND_HEAD = {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings"}
# vLLM's LoRA modules per base model_type: what its model class for that architecture adapts (the linear layers,
# by their Hugging Face names and by the fused names its packed_modules_mapping gives them: q/k/v_proj -> qkv_proj,
# gate/up_proj -> gate_up_proj) and its embedding_modules. Read from vllm/model_executor/models/{llama,qwen2}.py
# and its registry (MistralForCausalLM runs on vLLM's LlamaForCausalLM). Other architectures are not judged here.
_VLLM_DECODER = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
VLLM_LORA_MODULES = {
    "llama": _VLLM_DECODER | {"embed_tokens", "lm_head"},
    "mistral": _VLLM_DECODER | {"embed_tokens", "lm_head"},
    "qwen2": _VLLM_DECODER,  # its embedding_modules is empty: no LoRA on the embedding or the head
}
# Architectures whose vLLM model class takes no LoRA adapter at all (it does not implement SupportsLoRA).
VLLM_WITHOUT_LORA = {"gpt2"}


@dataclass
class Adapter:
    """What a check needs to know about an adapter directory, from its config and its weights' header."""

    path: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # canonical tensor key -> shape
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank (from lora_A's shape)
    experts: dict[str, "Adapter"] = field(default_factory=dict)  # a saved mixture's experts (config: mixture_config.json)
    base: Path | None = None  # the model directory it was trained on, when known (--base, or its config's local path)
    notes: list[str] = field(default_factory=list)  # what a check could not judge, said beside its verdict

    @property
    def peft_type(self) -> str:
        return "MIXTURE" if self.experts else str(self.config.get("peft_type", "LORA")).upper()

    @property
    def max_rank(self) -> int:
        if self.experts:
            return max(e.max_rank for e in self.experts.values())
        return max(self.ranks.values(), default=int(self.config.get("r", 0) or 0))

    def leaves(self) -> set[str]:
        return {m.rsplit(".", 1)[-1] for m in self.ranks}


@dataclass
class Problem:
    what: str  # why the engine cannot serve it, in a sentence
    fix: str | None = None  # the name of the conversion (CONVERSIONS) that removes it, or None when none exists


@dataclass
class Conversion:
    """A rewrite of an adapter into a servable one: `convert(adapter, out_dir, engine)` writes PEFT-format files.
    One that `needs_base` reads the weights of the model the adapter was trained on: it is called with `base=` (a
    model directory), and `fix` refuses before writing anything when none is given."""

    name: str
    describe: str
    convert: Callable[..., None]
    needs_base: bool = False


CONVERSIONS: dict[str, Conversion] = {}


def register_conversion(conversion: Conversion) -> None:
    """Plug a conversion in (convert.py registers "adalora-to-lora" and "pissa-to-lora"); problems name it by `fix`."""
    CONVERSIONS[conversion.name] = conversion


# Problems a conversion from another module fixes, by peft_type or init_lora_weights: (message, conversion name).
TYPE_FIXES = {"ADALORA": ("an AdaLoRA adapter (SVD-form factors with a learned rank budget)", "adalora-to-lora")}
INIT_FIXES = {
    "pissa": ("a PiSSA adapter (trained on a base whose principal components were taken out)", "pissa-to-lora"),
    "olora": ("an OLoRA adapter (trained on a base whose leading QR factors were taken out)", "pissa-to-lora"),
}


# --- reading ------------------------------------------------------------------------------------------


def read(path: str | os.PathLike) -> Adapter:
    """The config and header of an adapter directory, or of a saved mixture and its experts (errors name the file
    and what is wrong)."""
    path = Path(path)
    if is_mixture_dir(path):
        config = mixture_config(path)
        experts = {}
        for name, directory in config.experts.items():
            try:
                experts[name] = read(directory)
            except LorakitError as e:
                raise type(e)(f"mixture {str(path)!r}, expert {name!r}: {e}") from None
        read_router_header(path)
        return Adapter(path, read_mixture_config(path), {}, experts=experts)
    config = _read_config_json(path)
    shapes = {}
    for key, (shape, _) in read_tensor_header(path).items():
        canonical = canonical_key(key)
        if canonical is not None:
            shapes[canonical] = shape
    adapter = Adapter(path, config, shapes)
    for key, shape in shapes.items():
        factor = split_factor_key(key)
        if factor is not None and factor[1] in ("lora_A", "lora_embedding_A") and shape:
            adapter.ranks[factor[0]] = shape[0]
    return adapter


def adapter_dirs(root: str | os.PathLike) -> list[Path]:
    """`root` itself when it is an adapter directory or a saved mixture, else every adapter directory and mixture
    under it (a registry root; a mixture's own experts are checked with it, not apart), with the first-level
    directories that hold weights but no adapter_config.json (reported broken, as the server lists them)."""
    root = Path(root)
    if (root / CONFIG_NAME).exists() or is_mixture_dir(root) or not root.is_dir():
        return [root]
    return registry_dirs(root, adapter_and_mixture_dirs(root, CONFIG_NAME))


# --- the checks ---------------------------------------------------------------------------------------


def problems(adapter: Adapter, engine: str) -> list[Problem]:
    """Why `engine` cannot serve `adapter` (empty: it can)."""
    if engine not in ENGINES:
        raise ConfigError(f"--for takes one of {', '.join(ENGINES)}, got {engine!r}")
    if adapter.experts:
        return _mixture(adapter, engine)
    return {"vllm": _vllm, "lorax": _lorax, "peft": _peft, "lorakit": _lorakit}[engine](adapter)


def _mixture(adapter: Adapter, engine: str) -> list[Problem]:
    """lorakit serves a saved mixture whose experts it serves; the others have no learned router."""
    if engine != "lorakit":
        name = {"vllm": "vLLM", "lorax": "LoRAX", "peft": "PEFT"}[engine]
        return [Problem(f"it is a lorakit mixture of {len(adapter.experts)} LoRA experts with a learned router (each "
                        f"layer weights the experts per token), which {name} does not have; serve it with lorakit "
                        "serve, or serve its experts as plain adapters (or one combination of them: lorakit combine)")]
    found = [Problem(f"its expert {name!r}: {p.what}", p.fix) for name, expert in adapter.experts.items()
             for p in _lorakit(expert)]
    adapter.notes.extend(dict.fromkeys(n for expert in adapter.experts.values() for n in expert.notes))
    return found


def _common(adapter: Adapter, engine: str) -> list[Problem]:
    """What vLLM and LoRAX (multi-adapter servers with one LoRA kernel) both refuse."""
    c, found = adapter.config, []
    if adapter.peft_type in TYPE_FIXES:
        what, fix = TYPE_FIXES[adapter.peft_type]
        found.append(Problem(f"it is {what}; {engine} serves plain LoRA", fix))
        return found
    if adapter.peft_type != "LORA":
        return [Problem(f"peft_type is {adapter.peft_type}; {engine} serves LoRA adapters only")]
    init = c.get("init_lora_weights")
    init = init.lower() if isinstance(init, str) else ""
    if init in INIT_FIXES:
        what, fix = INIT_FIXES[init]
        found.append(Problem(f"it is {what}; it needs that changed base, which {engine} does not have", fix))
    elif init.startswith("pissa_niter_"):
        # The starting factors came from a randomised SVD: recomputing them from the base gives other ones.
        found.append(Problem(f"it is a PiSSA adapter initialised by a randomised SVD ({init}) and trained on a base "
                             f"whose principal components were taken out, which {engine} does not have; those "
                             "components cannot be recomputed exactly, so no plain LoRA can be written from the file "
                             "(save the trained model again with lorakit.save_adapter: its default form is plain "
                             "LoRA)"))
    if c.get("use_dora"):
        found.append(Problem(f"it uses DoRA (use_dora=true), which {engine} does not support; DoRA's magnitude cannot "
                             "be folded into plain LoRA factors (merge it into the base instead)"))
    if (c.get("bias") or "none") != "none" or c.get("lora_bias"):
        found.append(Problem(f"it trains biases (bias={c.get('bias')!r}, lora_bias={c.get('lora_bias', False)}), which "
                             f"{engine} does not load"))
    saved = [m for m in (c.get("modules_to_save") or []) if m.rsplit(".", 1)[-1] not in EMBEDDINGS_AND_HEAD]
    if saved:
        found.append(Problem(f"it trains full copies of {saved} (modules_to_save); {engine} takes trained copies of "
                             "the embedding and the head only"))
    for key, value in c.items():
        if key in PEFT_MATH_KEYS and value not in (None, False, [], {}, 0):
            found.append(Problem(f"it sets {key}={value!r} ({PEFT_MATH_KEYS[key]}), which {engine} does not support"))
    if c.get("rank_pattern") or c.get("alpha_pattern") or len(set(adapter.ranks.values())) > 1:
        found.append(Problem(f"its layers have different ranks or scales (rank_pattern={c.get('rank_pattern') or {}}, "
                             f"alpha_pattern={c.get('alpha_pattern') or {}}); {engine} applies one rank and one "
                             "scale α/r to every layer", "rank-padding"))
    return found


def _vllm(adapter: Adapter) -> list[Problem]:
    found = _common(adapter, "vLLM") + _vllm_modules(adapter)
    if adapter.max_rank > VLLM_RANKS[-1]:
        found.append(Problem(f"its rank {adapter.max_rank} is above vLLM's largest --max-lora-rank, {VLLM_RANKS[-1]}"))
    return found


def _vllm_modules(adapter: Adapter) -> list[Problem]:
    """The adapted modules against vLLM's LoRA modules for the base's architecture, where that is known."""
    model_type = base_model_type(adapter)
    if model_type in VLLM_WITHOUT_LORA:
        return [Problem(f"vLLM's {model_type} model takes no LoRA adapters (its model class does not implement "
                        "SupportsLoRA); merge the adapter into the base (lorakit merge) and serve the merged model")]
    if model_type in VLLM_LORA_MODULES:
        odd = sorted(adapter.leaves() - VLLM_LORA_MODULES[model_type])
        return [Problem(f"it adapts modules {odd}, which vLLM does not put LoRA on in {model_type} models (it "
                        f"adapts {sorted(VLLM_LORA_MODULES[model_type])})")] if odd else []
    adapter.notes.append("its target modules were not checked against vLLM's LoRA modules for this architecture ("
                         + (f"model_type {model_type!r}" if model_type else "base unknown: pass --base DIR") + ")")
    return _modules_no_engine_adapts(adapter, "vLLM")


def _modules_no_engine_adapts(adapter: Adapter, engine: str) -> list[Problem]:
    odd = sorted(adapter.leaves() - SERVED_MODULES)
    return [Problem(f"it adapts modules {odd}, which {engine} does not put LoRA on in the architectures it supports "
                    "(check its model's supported LoRA modules)")] if odd else []


def base_model_type(adapter: Adapter) -> str | None:
    """The model_type in the config.json of the adapter's base, when its base is known."""
    if adapter.base is None:
        return None
    try:
        model_type = json.loads((adapter.base / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def _lorax(adapter: Adapter) -> list[Problem]:
    return _common(adapter, "LoRAX") + _modules_no_engine_adapts(adapter, "LoRAX")


def _peft(adapter: Adapter) -> list[Problem]:
    found = []
    unknown = sorted(k for k in adapter.config if k not in PEFT_LORA_KEYS and k not in PEFT_MATH_KEYS)
    if adapter.peft_type == "LORA" and unknown:
        found.append(Problem(f"its config has keys PEFT's LoraConfig does not take: {unknown}", "canonical-files"))
    with safe_open(str(adapter.path / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
    spelled = [k for k in keys if not k.startswith(PREFIX) or canonical_key(k) != k[len(PREFIX):]
               or _plain(k, adapter.peft_type) != k]
    if spelled:
        found.append(Problem(f"{len(spelled)} tensor keys are not spelled as PEFT writes them (e.g. {spelled[0]!r})",
                             "canonical-files"))
    return found


def _lorakit(adapter: Adapter) -> list[Problem]:
    """The server's own rule (lorakit.servable, which its store refuses by); with a base, against its modules."""
    try:
        config = read_adapter_config(adapter.path)
        modules = base_modules(adapter.base) if adapter.base is not None else None
        files = check_adapter_files(adapter.path, modules=modules) if modules is not None else None
    except LorakitError as e:
        return [Problem(str(e))]
    if modules is None:
        adapter.notes.append("its layers were not checked against a base model's (pass --base DIR to check them)")
    return [Problem(r.what, INIT_FIXES.get(config.init, (None, None))[1] if r.residual else None)
            for r in refusals(adapter.path, config, files, modules)]


@functools.lru_cache(maxsize=4)
def base_modules(base: Path) -> dict[str, Any]:
    """The modules of the model in `base` by logical name, built from its config alone (meta device, no weights)."""
    from .hf import meta_model

    try:
        return dict(logical_modules(meta_model(base)))
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"cannot build the model of {base} from its config.json: {e}") from None


def base_dir(adapter: Adapter, base: str | os.PathLike | None) -> Path | None:
    """The base to check against: `base` when given, else the adapter config's base_model_name_or_path when that
    is a local model directory."""
    if base is not None:
        return Path(base).resolve()
    named = adapter.config.get("base_model_name_or_path")
    if isinstance(named, str) and named and (Path(named) / "config.json").is_file():
        return Path(named).resolve()
    return None


def servable_rank(adapter: Adapter) -> int | None:
    """The smallest vLLM --max-lora-rank that fits the adapter."""
    return next((r for r in VLLM_RANKS if r >= adapter.max_rank), None)


# --- conversions defined here ---------------------------------------------------------------------


def _factor_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        canonical = canonical_key(key)
        factor = split_factor_key(canonical) if canonical is not None else None
        if factor is not None:
            pairs.setdefault(factor[0], {})[factor[1]] = (canonical, value)
    return pairs


def pad_ranks(adapter: Adapter, out: Path, engine: str) -> None:
    """Every layer to one rank R (the largest), each layer's scale folded into its B, one scale 1 = α/R for all:
    `s_i·B_i·A_i = (s_i·B_i ⊕ 0)·(A_i ⊕ 0)` exactly, so the adapter computes the same on any engine."""
    config = read_adapter_config(adapter.path)
    R = max(adapter.ranks.values())
    tensors = {}
    for module, parts in _factor_pairs(read_adapter_tensors(adapter.path)).items():
        (key_A, A), (key_B, B) = (parts[t] for t in sorted(parts))  # "lora_A" < "lora_B" (also for embeddings)
        r, scale = A.shape[0], config.scale_for(module)
        A2 = torch.zeros(R, *A.shape[1:], dtype=A.dtype)
        B2 = torch.zeros(B.shape[0], R, *B.shape[2:], dtype=B.dtype)
        A2[:r] = A
        B2[:, :r] = (B.double() * scale).to(B.dtype)
        tensors[PREFIX + _plain(key_A)], tensors[PREFIX + _plain(key_B)] = A2, B2
    peft = _read_config_json(adapter.path)
    peft.update(r=R, lora_alpha=R, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    _write(out, tensors, peft)


def canonical_files(adapter: Adapter, out: Path, engine: str) -> None:
    """The same tensors under PEFT's key spellings, and a config with only the keys PEFT's LoraConfig takes."""
    tensors = {}
    for key, value in read_adapter_tensors(adapter.path).items():
        canonical = canonical_key(key)
        if canonical is not None:
            tensors[PREFIX + _plain(canonical, adapter.peft_type)] = value
    peft = {k: v for k, v in _read_config_json(adapter.path).items() if k in PEFT_LORA_KEYS or k in PEFT_MATH_KEYS}
    _write(out, tensors, peft)


def _plain(key: str, peft_type: str = "LORA") -> str:
    """A factor key without an adapter name inside (`lora_A.default.weight` → `lora_A.weight`). Only LoRA's A and B
    are Linear/Conv modules in PEFT (`.weight`); AdaLoRA's triplets, DoRA's magnitude, VeRA's scalings and the
    embedding factors are bare parameters."""
    factor = split_factor_key(key)
    if factor is None:
        return key
    module, token = factor
    return f"{module}.{token}" + (".weight" if peft_type == "LORA" and token in ("lora_A", "lora_B") else "")


def _write(out: Path, tensors: dict[str, torch.Tensor], peft: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_NAME, peft)


register_conversion(Conversion("rank-padding", "pad every layer to one rank, each layer's scale folded into B", pad_ranks))
register_conversion(Conversion("canonical-files", "PEFT's key spellings and config keys", canonical_files))


# --- the command's work -------------------------------------------------------------------------------


def check(path: str | os.PathLike, engine: str, base: str | os.PathLike | None = None) -> tuple[Adapter | None, list[Problem]]:
    """(the adapter, its problems for `engine`); a directory that cannot be read is one problem saying why. `base`
    is the model directory it was trained on (default: its config's base_model_name_or_path, if that is local)."""
    try:
        adapter = read(path)
    except LorakitError as e:
        return None, [Problem(str(e))]
    adapter.base = base_dir(adapter, base)
    for expert in adapter.experts.values():  # a mixture's experts are checked against its base
        expert.base = adapter.base or base_dir(expert, None)
    return adapter, problems(adapter, engine)


def fix(adapter: Adapter, found: list[Problem], engine: str, out: str | os.PathLike,
        base: str | os.PathLike | None = None) -> list[str]:
    """Write a servable copy to `out` by applying each problem's conversion in turn; the conversions applied.
    `base` is the model directory the adapter was trained on, for conversions that need it (PiSSA's).
    Raises ConfigError naming the problems that no conversion removes (nothing is written then)."""
    unfixable = [p.what for p in found if p.fix is None]
    missing = sorted({p.fix for p in found if p.fix is not None and p.fix not in CONVERSIONS})
    if unfixable or missing:
        why = unfixable + [f"the {m} conversion is not available in this lorakit" for m in missing]
        raise ConfigError(f"no servable copy of {str(adapter.path)!r} for {engine} can be written: " + "; ".join(why))
    needing = [p.fix for p in found if p.fix is not None and CONVERSIONS[p.fix].needs_base]
    if needing and base is None:
        trained_on = adapter.config.get("base_model_name_or_path")
        raise ConfigError(f"the {needing[0]} conversion of {str(adapter.path)!r} recomputes what the adapter took out "
                          "of its base, so it needs that base model: pass --base DIR (the model it was trained on"
                          + (f", {trained_on!r} by its config" if trained_on else "") + "); nothing was written")
    applied, current, out = [], adapter, Path(out)
    for name in dict.fromkeys(p.fix for p in found):
        _apply(CONVERSIONS[name], current, out, engine, base)
        applied.append(name)
        current = _reread(out, adapter)
    for name in dict.fromkeys(p.fix for p in problems(current, engine) if p.fix is not None):
        if name not in applied:  # e.g. AdaLoRA → LoRA leaves a rank_pattern for rank padding
            _apply(CONVERSIONS[name], current, out, engine, base)
            applied.append(name)
            current = _reread(out, adapter)
    return applied


def copy_as_is(adapter: Adapter, out: str | os.PathLike) -> None:
    """`--fix` on an adapter with nothing to fix: its files copied unchanged, so that a pipeline finds a servable
    copy at --out either way."""
    out = Path(out)
    if out.resolve() == adapter.path.resolve():
        return
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        atomic_write(out / name, lambda tmp, name=name: shutil.copyfile(adapter.path / name, tmp))


def _reread(out: Path, original: Adapter) -> Adapter:
    current = read(out)
    current.base = original.base
    return current


def _apply(conversion: Conversion, adapter: Adapter, out: Path, engine: str, base) -> None:
    if conversion.needs_base:
        conversion.convert(adapter, out, engine, base=base)
    else:
        conversion.convert(adapter, out, engine)


def report(path: Path, adapter: Adapter | None, found: list[Problem], engine: str) -> str:
    notes = [f"  note: {n}" for n in (adapter.notes if adapter is not None else [])]
    if not found:
        hint = f" (start vLLM with --max-lora-rank {servable_rank(adapter)} or more)" if engine == "vllm" else ""
        return "\n".join([f"ok: {path} can be served by {engine}{hint}"] + notes)
    lines = [f"no: {path} cannot be served by {engine}:"]
    for p in found:
        if p.fix is None:
            lines.append(f"  - {p.what} [no conversion exists]")
        else:
            given = " with --base DIR" if p.fix in CONVERSIONS and CONVERSIONS[p.fix].needs_base else ""
            lines.append(f"  - {p.what} [fix: --fix{given} applies {p.fix}]")
    return "\n".join(lines + notes)

