"""keep_freed_memory: after it, a large tensor comes from malloc's heap, not from fresh mmap'd pages."""
import platform
import subprocess
import sys

import pytest

import surelock_fx.cli

# Run in a child process: the settings are process-wide, and the test process must keep glibc's defaults
# for the "before" half to mean anything.
PROBE = """
import ctypes, torch
from surelock_fx.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_by(nbytes):
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before

size = 64 << 20
print(mapped_by(size), keep_freed_memory(), mapped_by(size))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_large_tensors_come_from_the_heap_after_keep_freed_memory():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    mapped_before, applied, mapped_after = result.stdout.split()
    assert int(mapped_before) >= 64 << 20  # glibc's default: its own mmap
    assert applied == "True"
    assert int(mapped_after) == 0


def test_the_cli_keeps_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(surelock_fx.cli, "keep_freed_memory", lambda: calls.append(1) or True)
    argv = ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]
    assert surelock_fx.cli.main(argv) == surelock_fx.cli.EXIT_ERROR
    assert calls == [1]
