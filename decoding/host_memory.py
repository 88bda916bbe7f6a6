"""Large host tensors in transparent huge pages.

A CPU decode step streams every weight once, and attention reads each sequence's K/V. With 4 KiB pages a hardware
prefetcher stops at each page's end and every page costs a TLB entry; with 2 MiB pages streams run on. Linux's
usual THP mode (`madvise`) gives huge pages only to memory so advised, and torch's CPU allocator advises every
allocation of 2 MiB or more (aligned to 2 MiB) when `THP_MEM_ALLOC_ENABLE=1` is in the environment at its first
allocation: leapserve sets it unless it is set (BENCHMARKS.md, "Weights and K/V in huge pages").
"""

from __future__ import annotations

import os
from pathlib import Path

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def request_huge_pages() -> None:
    """torch's large CPU allocations in huge pages, unless `THP_MEM_ALLOC_ENABLE` is set (0 turns it off). torch reads
    the variable once, at its first CPU allocation: a process that allocated a tensor before importing leapserve
    keeps 4 KiB pages."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def huge_page_bytes() -> int | None:
    """This process's anonymous memory in transparent huge pages, or None where the kernel does not say (not Linux)."""
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    for line in rollup.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return None
