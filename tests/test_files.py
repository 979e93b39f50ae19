"""Atomic writes give their results the permissions a plain write would (not the temp files' 0600/0700)."""

import os
import stat

import pytest

from lorakit.files import atomic_directory, atomic_write_text, umask


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_results_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write_text(tmp_path / "f.json", "{}")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "x.bin").write_bytes(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "d" / "x.bin").stat().st_mode) == file_mode
