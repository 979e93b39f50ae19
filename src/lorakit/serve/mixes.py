"""What a request runs: the base, one adapter, or a weighted mix of adapters (`"model": "code:0.6+chat:0.4"`, an
`adapters` field, or LoRAX's `adapter_id`), checked against the registered names; and pinning each adapter of a
mix as the store pins one. The mix itself is computed per row in the running batch (lorakit.rows)."""

from __future__ import annotations

import math
from typing import Collection

from ..rows import adapters_of
from .api_models import APIError
from .jobs import Choice  # None: the base; a name; or a mix of (name, weight) pairs (store names, or model names once pinned)

__all__ = ["Choice", "SYNTAX", "parse_model", "from_field", "check_mix", "adapters_of", "on_model", "acquire", "release"]

SYNTAX = ("a mix is written name:weight+name:weight, e.g. code:0.6+chat:0.4 (weights are finite numbers, "
          "negative allowed; a name alone weighs 1)")


def parse_model(text: str, base_name: str, names: Collection[str], param: str = "model") -> Choice:
    """The base (None), a registered adapter's name, or the mix `text` writes; 404 for an unknown name, 400 for a
    malformed mix. A registered name is always itself, even when it contains ':' or '+'."""
    if text == base_name:
        return None
    if text in names:
        return text
    if "+" not in text and ":" not in text:
        raise _unknown(text, base_name, names, param)
    pairs = []
    for part in text.split("+"):
        part = part.strip()
        if not part:
            raise APIError(400, f"{param} {text!r} has an empty part; {SYNTAX}", param=param, code="invalid_mix")
        if part in names:
            pairs.append((part, 1.0))
            continue
        name, colon, weight = part.rpartition(":")
        if not colon:
            name, weight = part, "1"
        elif not name:
            raise APIError(400, f"{param} {text!r}: {part!r} has no adapter name; {SYNTAX}", param=param, code="invalid_mix")
        try:
            value = float(weight)
        except ValueError:
            if "+" not in text and name.strip() not in names:  # e.g. "org:model": a name this server does not know
                raise _unknown(text, base_name, names, param) from None
            raise APIError(400, f"{param} {text!r}: the weight {weight!r} of {name!r} is not a number; {SYNTAX}",
                           param=param, code="invalid_mix") from None
        pairs.append((name.strip(), value))
    return check_mix(pairs, base_name, names, param, text)


def from_field(value, base_name: str, names: Collection[str], param: str = "adapters") -> Choice:
    """The `adapters` field: {name: weight} or [{"name": ..., "weight": ...}, ...] (validated by api_models)."""
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = [(part.name, part.weight) for part in value]
    return check_mix(pairs, base_name, names, param, value)


def check_mix(pairs: list[tuple[str, float]], base_name: str, names: Collection[str], param: str, given) -> Choice:
    if not pairs:
        raise APIError(400, f"{param} is an empty mix; name at least one adapter ({SYNTAX})", param=param, code="invalid_mix")
    seen = set()
    for name, weight in pairs:
        if name == base_name:
            raise APIError(400, f"{param} {given!r} names the base model {base_name!r}, which adds nothing to a mix; "
                           "leave it out", param=param, code="invalid_mix")
        if name not in names:
            raise _unknown(name, base_name, names, param, given)
        if not math.isfinite(weight):
            raise APIError(400, f"{param} {given!r}: the weight of {name!r} is {weight}; weights must be finite numbers",
                           param=param, code="invalid_mix")
        if name in seen:
            raise APIError(400, f"{param} {given!r} names {name!r} twice; give each adapter one weight", param=param,
                           code="invalid_mix")
        seen.add(name)
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]  # one adapter at full weight: the adapter itself
    return tuple((name, float(weight)) for name, weight in pairs)


def on_model(choice: Choice, model_names: dict[str, str]) -> Choice:
    """The choice with each store name replaced by its name on the model (what acquire() returned)."""
    if choice is None or isinstance(choice, str):
        return None if choice is None else model_names[choice]
    return tuple((model_names[name], weight) for name, weight in choice)


def acquire(source, choice: Choice) -> Choice:
    """Pin every adapter of `choice` (loading it if needed), all or none; the choice in model names."""
    model_names: dict[str, str] = {}
    try:
        for name in adapters_of(choice):
            model_names[name] = source.acquire(name)
    except BaseException:
        for name in model_names:
            source.release(name)
        raise
    return on_model(choice, model_names)


def release(source, choice: Choice) -> None:
    for name in adapters_of(choice):
        source.release(name)


def _unknown(name: str, base_name: str, names: Collection[str], param: str, given=None) -> APIError:
    where = f" (in the mix {given!r})" if given is not None and given != name else ""
    return APIError(404, f"the model {name!r}{where} does not exist; known models: {', '.join([base_name, *names])}",
                    param=param, code="model_not_found")
