"""A virtual environment holding the `lorax-client` package, for tests that run the real client against our server.

lorax-client pins an older huggingface-hub than transformers 5 accepts, so it cannot live in the project's
environment: it gets its own, made once under the cache directory (`$LORAKIT_CACHE`, else ~/.cache/lorakit).
`python -m tests.serve.lorax_client` makes it ahead of time (CI does, so the tests do not pay for it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

PACKAGE = "lorax-client==0.6.3"


def env_dir() -> Path:
    cache = Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")
    return cache / f"venv-{PACKAGE.replace('==', '-')}"


def client_python(install: bool = True) -> tuple[Path | None, str]:
    """(the environment's python, "") when lorax-client imports there, else (None, why not)."""
    root = env_dir()
    python = root / "bin" / "python"
    if python.exists() and _imports(python):
        return python, ""
    if not install:
        return None, f"no environment with {PACKAGE} at {root}"
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", PACKAGE],
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not make a virtual environment with {PACKAGE}: {e}"
    if done.returncode != 0 or not _imports(python):
        return None, f"pip could not install {PACKAGE} (no network to PyPI?): {done.stderr.strip()[-300:]}"
    return python, ""


def _imports(python: Path) -> bool:
    return subprocess.run([str(python), "-c", "import lorax"], capture_output=True).returncode == 0


if __name__ == "__main__":
    path, why = client_python()
    print(path or why)
    sys.exit(0 if path else 1)
