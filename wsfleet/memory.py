"""A process's memory, read from /proc: what `--max-worker-memory` bounds and what `wsfleet
bench memory` reports.

USS (unique set size) is a process's private resident pages: the memory its exit would give
back. A forked worker shares the pages the master loaded before forking
(websockets, the event loop: master.preload) with it and its siblings; RSS counts those in
every worker, PSS a share of them that moves whenever a sibling starts or exits. USS counts
only what the worker itself grew, which is what a bound on growth is about.

Linux only (smaps_rollup: 4.14 and later). Reading it walks the process's page tables: the
master reads each worker's every config.MEMORY_INTERVAL seconds, only when the bound is on
(docs/operations.md measures what one read costs)."""

from __future__ import annotations

import os

_PRIVATE = (b"Private_Clean:", b"Private_Dirty:", b"Private_Hugetlb:")


def uss(pid: int) -> int:
    """A process's unique memory in bytes: the Private_Clean, Private_Dirty and
    Private_Hugetlb lines of /proc/PID/smaps_rollup, as psutil's memory_full_info() reads
    them. OSError when the process is gone (or not ours to read)."""
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        data = f.read()
    total = 0
    for line in data.splitlines():
        if line.startswith(_PRIVATE):
            total += int(line.split()[1]) * 1024  # (in kB)
    return total


def rss(pid: int) -> int:
    """A process's resident memory in bytes (statm's resident pages, as psutil reads it)."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
