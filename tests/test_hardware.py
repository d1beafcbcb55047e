"""The process-level tuning genframe applies for training (`genframe.hardware`)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from genframe import hardware

# A fresh interpreter: malloc 8 MiB and report whether it was served by mmap (glibc's
# mallinfo2 counts those blocks in `hblks`), after tune_allocator() or not.
PROBE = """
import ctypes, sys
from genframe.hardware import tune_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
tuned = tune_allocator() if sys.argv[1] == "tune" else None
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)
print(tuned, libc.mallinfo2().hblks - before)
"""


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 - glibc >= 2.33
        return True
    except (OSError, AttributeError, TypeError):
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2) to observe malloc")
def test_tune_allocator_keeps_large_blocks_on_the_heap(monkeypatch):
    monkeypatch.delenv(hardware.ALLOCATOR_ENV, raising=False)

    def probe(mode: str) -> str:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
        return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                              check=True, env=env).stdout.split()

    assert probe("plain") == ["None", "1"]  # glibc's default: 8 MiB comes from mmap
    assert probe("tune") == ["True", "0"]  # tuned: from the heap, reused by the next step


@pytest.mark.parametrize("env", [{hardware.ALLOCATOR_ENV: "0"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_tune_allocator_leaves_a_tuned_or_opted_out_process_alone(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    hardware.tune_allocator.cache_clear()
    try:
        assert hardware.tune_allocator() is False
    finally:
        hardware.tune_allocator.cache_clear()


@pytest.mark.parametrize("devices, expected", [([0, 3], "has 2 CUDA GPUs, indices 0..1"),
                                               (4, "has 2 CUDA GPUs; expected trainer.devices=2")])
def test_devices_beyond_the_gpus_are_refused_with_the_count(devices, expected):
    with pytest.raises(hardware.UserError, match=expected.replace(".", r"\.")):
        hardware._check_devices(devices, on_gpu=True, n_gpus=2, strategy="auto", where="")


@pytest.mark.parametrize("value, wanted", [("0", False), ("false", False), ("OFF", False), (" no ", False),
                                           ("1", True), ("true", True), ("", True)])
def test_the_allocator_switch_reads_on_and_off_words(monkeypatch, value, wanted):
    monkeypatch.setenv(hardware.ALLOCATOR_ENV, value)
    assert hardware.allocator_tuning_wanted() is wanted


def test_the_allocator_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(hardware.ALLOCATOR_ENV, "fast")
    hardware.tune_allocator.cache_clear()
    try:
        with pytest.raises(hardware.UserError, match="GENFRAME_MALLOC_TUNING='fast': expected 0"):
            hardware.tune_allocator()
    finally:
        hardware.tune_allocator.cache_clear()
