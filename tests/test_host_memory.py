"""Large host tensors in transparent huge pages once leapserve.decoding is imported (decoding/host_memory.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MODE = THP_MODE.read_text() if THP_MODE.exists() else ""

# 64 MiB touched after importing leapserve.decoding; prints the bytes of anonymous huge pages the process then holds
PROBE = """
import leapserve.decoding
import torch
from leapserve.decoding.host_memory import huge_page_bytes
x = torch.empty(64 << 20, dtype=torch.uint8)
x.fill_(1)
print(huge_page_bytes())
"""


def _huge_page_bytes(setting: str | None) -> int:
    """What PROBE prints with THP_MEM_ALLOC_ENABLE unset (None) or set to `setting`."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif("[madvise]" not in MODE, reason="the kernel's THP mode is not madvise (or it has no THP)")
def test_large_tensors_in_huge_pages_unless_turned_off():
    assert _huge_page_bytes(None) >= 32 << 20  # most of the 64 MiB (a partial huge page at either end is not)
    assert _huge_page_bytes("0") < 32 << 20  # an explicit setting is kept
