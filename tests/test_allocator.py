"""cai.allocator: inside `freed_memory_kept` a freed block stays in the process (no page faults to
get it back); outside it glibc returns it; leaving the block returns what was kept. Each case runs
in a fresh interpreter, whose allocator no earlier test has tuned."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cai.allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")

# Resident memory (from /proc) after a 256 MiB block was written and freed, inside the block
# or not, and after leaving it.
PROBE = """
import contextlib, os, sys
from cai.allocator import freed_memory_kept

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def churn():
    block = bytearray(256 * 2**20)  # zero-filled: every page is touched
    del block
    return resident_mib()

start = resident_mib()
if sys.argv[1] == "kept":
    with freed_memory_kept() as applied:
        during = churn()
    print(applied, round(during - start), round(resident_mib() - start))
else:
    print(None, round(churn() - start), None)
"""


def probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_freed_memory_stays_in_the_process_only_within_the_block() -> None:
    applied, during, after = probe("kept")
    assert applied == "True"
    assert int(during) >= 200, f"the freed 256 MiB went back to the kernel ({during} MiB kept)"
    assert int(after) < 64, f"leaving the block kept {after} MiB"
    _, plain, _ = probe("plain")
    assert int(plain) < 64, f"glibc's defaults kept {plain} MiB of a freed 256 MiB block"
