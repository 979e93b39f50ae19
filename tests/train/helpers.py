"""Small data files for training tests (fixtures, not evidence: the real data set ships in lorakit/data)."""

import json
import string


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def letter_rows(n=64):
    """prompt 'w: k\\nc:' -> completion ' v' or ' c' (vowel or consonant): learnable in a few steps."""
    letters = string.ascii_lowercase
    return [{"prompt": f"w: {letters[i % 26]}\nc:", "completion": " v" if letters[i % 26] in "aeiou" else " c"}
            for i in range(n)]


def class_rows(n=64):
    return [{"text": ("aaa " if i % 2 else "zzz ") + string.ascii_lowercase[i % 26], "label": "pos" if i % 2 else "neg"}
            for i in range(n)]
