"""Build the WordNet subsets bundled in src/lorakit/data/ from Debian's wordnet-base, deterministically.

    apt-get install wordnet-base && python scripts/build_wordnet_data.py

Writes wordnet_categories.jsonl (causal LM: word -> category), wordnet_glosses.jsonl (classification:
gloss -> category) and WORDNET_LICENSE. Word familiarity is judged with the built-in model's tokenizer, so
the first run converts the built-in model (see lorakit.train.builtin.default_model_dir).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.train.builtin import (CATEGORIES, COMPLETION_TEMPLATE, DATA_DIR, DATA_FILES, PROMPT_TEMPLATE,
                                   default_model_dir)

WORDNET_DIR = Path("/usr/share/wordnet")
COPYRIGHT_FILE = Path("/usr/share/doc/wordnet-base/copyright")
SEED = 0
WORDS_PER_CATEGORY = 180
GLOSSES_PER_CATEGORY = 300
LEXFILE_TO_CATEGORY = {number: name for name, number in CATEGORIES.items()}


@dataclass
class Synset:
    lexfile: int
    words: list[str]  # as written in WordNet: case kept, "_" for spaces
    lex_ids: list[int]  # with lexfile, they make each word's sense key ("dog%1:05:00::")
    gloss: str  # the definition, without the example sentences


@dataclass
class IndexEntry:
    tagged: int  # senses seen in the SemCor corpus; they come first in `offsets`, most frequent first
    offsets: list[str]


def read_synsets(path: Path) -> dict[str, Synset]:
    """data.noun: `offset lexfile pos w_cnt(hex) word lex_id ... | gloss` (wndb(5WN)).

    The licence header's lines start with two spaces."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split(" ")
        n_words = int(fields[3], 16)
        words, lex_ids = fields[4:4 + 2 * n_words:2], [int(i, 16) for i in fields[5:5 + 2 * n_words:2]]
        synsets[fields[0]] = Synset(int(fields[1]), words, lex_ids, gloss.split('; "')[0].strip())
    return synsets


def read_index(path: Path) -> dict[str, IndexEntry]:
    """index.POS: `lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offset...`."""
    entries = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split()
        n_pointers = int(fields[3])
        entries[fields[0]] = IndexEntry(int(fields[5 + n_pointers]), fields[6 + n_pointers:])
    return entries


def read_sense_counts(path: Path) -> dict[str, int]:
    """cntlist.rev: `sense_key sense_number tag_cnt`, how often each sense occurs in the SemCor corpus."""
    counts = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        key, _, count = line.split()
        counts[key] = int(count)
    return counts


def sense_count(lemma: str, synset: Synset, counts: dict[str, int]) -> int:
    lex_id = synset.lex_ids[[w.lower() for w in synset.words].index(lemma)]
    return counts.get(f"{lemma}%1:{synset.lexfile:02d}:{lex_id:02d}::", 0)


def word_category(lemma: str, entry: IndexEntry, synsets: dict[str, Synset], counts: dict[str, int],
                  other_pos: list[dict]) -> str | None:
    """The category of a plain noun whose main sense is in one of CATEGORIES, or None if it is not clear-cut."""
    if not re.fullmatch(r"[a-z]{3,}", lemma):
        return None
    senses = [synsets[o] for o in entry.offsets]
    first = senses[0]
    category = LEXFILE_TO_CATEGORY.get(first.lexfile)
    if category is None or lemma not in first.words:  # capitalised there: a name, a genus, an acronym
        return None
    if entry.tagged == 0 and any(s.lexfile != first.lexfile for s in senses):
        return None  # no frequencies, so the order of senses means nothing ("chess": a grass before the game)
    rivals = [s for s in senses if s.lexfile in LEXFILE_TO_CATEGORY and s.lexfile != first.lexfile]
    if rivals:  # keep "dog" (animal 42, person 0), drop "chicken" (food 16, animal 10) and "whale" (person 1)
        main = sense_count(lemma, first, counts)
        if main < 3 or any(3 * sense_count(lemma, s, counts) > main for s in rivals):
            return None
    for index in other_pos:  # mainly a verb or an adjective ("swallow", "quick"): skip
        if lemma in index and (entry.tagged == 0 or index[lemma].tagged >= entry.tagged):
            return None
    return category


def is_plural_of_listed(lemma: str, nouns: dict) -> bool:
    return lemma.endswith("s") and (lemma[:-1] in nouns or (lemma.endswith("es") and lemma[:-2] in nouns))


def familiarity(tagged: bool, n_tokens: int, lemma: str, rng: random.Random) -> tuple:
    """Sort key, most familiar first: seen in SemCor and short for the model's tokenizer (a BPE vocabulary
    holds a corpus's frequent words whole), then other one-token words, then the longest two-token words
    ("sunflower"), then the rest. Ties within the first two tiers are broken at random."""
    if tagged and n_tokens <= 2:
        return (0, rng.random())
    if n_tokens == 1:
        return (1, rng.random())
    return (2 if n_tokens == 2 else 3, n_tokens, -len(lemma), lemma)


def pick_words(synsets, nouns, counts, other_pos, count_tokens, rng: random.Random) -> dict[str, list[str]]:
    """`WORDS_PER_CATEGORY` familiar, clear-cut words per category; no word is in two categories."""
    candidates: dict[str, list[tuple]] = {name: [] for name in CATEGORIES}
    for lemma in sorted(nouns):
        category = word_category(lemma, nouns[lemma], synsets, counts, other_pos)
        if category is None or is_plural_of_listed(lemma, nouns):
            continue
        key = familiarity(nouns[lemma].tagged > 0, count_tokens(" " + lemma), lemma, rng)
        candidates[category].append((key, lemma))
    picked = {}
    for category, rows in candidates.items():
        rows.sort()
        if len(rows) < WORDS_PER_CATEGORY:
            raise SystemExit(f"only {len(rows)} words for {category}, need {WORDS_PER_CATEGORY}")
        picked[category] = [lemma for _, lemma in rows[:WORDS_PER_CATEGORY]]
    return picked


def pick_glosses(synsets: dict[str, Synset], rng: random.Random) -> list[dict[str, str]]:
    """`GLOSSES_PER_CATEGORY` definitions per category, from synsets with at least one all-lowercase word."""
    rows = []
    for category, lexfile in CATEGORIES.items():
        seen, pool = set(), []
        for offset in sorted(synsets):
            synset = synsets[offset]
            if synset.lexfile != lexfile or len(synset.gloss) < 15 or synset.gloss in seen:
                continue
            if not any(word.islower() for word in synset.words):  # names, genera ("genus_Erica"), families
                continue
            seen.add(synset.gloss)
            pool.append(synset.gloss)
        rows += [{"text": gloss, "label": category} for gloss in rng.sample(pool, GLOSSES_PER_CATEGORY)]
    rng.shuffle(rows)
    return rows


def licence_text(copyright_file: Path) -> str:
    """The `License: WordNet3.0` stanza of Debian's copyright file, unindented."""
    text = copyright_file.read_text()
    stanza = text.split("License: WordNet3.0\n", 1)[1].split("\n\n", 1)[0]
    lines = [line[1:] if line.startswith(" ") else line for line in stanza.splitlines()]
    return "\n".join("" if line == "." else line for line in lines).rstrip() + "\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    synsets = read_synsets(args.wordnet / "data.noun")
    nouns = read_index(args.wordnet / "index.noun")
    counts = read_sense_counts(args.wordnet / "cntlist.rev")
    other_pos = [read_index(args.wordnet / f"index.{pos}") for pos in ("verb", "adj", "adv")]

    rng = random.Random(SEED)
    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    words = pick_words(synsets, nouns, counts, other_pos, count_tokens, rng)
    rows = [{"prompt": PROMPT_TEMPLATE.format(word=word), "completion": COMPLETION_TEMPLATE.format(category=category)}
            for category, ws in words.items() for word in ws]
    rng.shuffle(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / DATA_FILES["causal-lm"], rows)
    glosses = pick_glosses(synsets, random.Random(SEED))
    write_jsonl(args.out / DATA_FILES["classify"], glosses)
    (args.out / "WORDNET_LICENSE").write_text(licence_text(COPYRIGHT_FILE))
    for name in (DATA_FILES["causal-lm"], DATA_FILES["classify"], "WORDNET_LICENSE"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
