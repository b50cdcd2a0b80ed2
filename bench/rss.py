"""Peak resident memory of a process and its children (the gateway and its workers)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

__all__ = ["RssSampler"]

PROC = Path("/proc")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in (PROC / str(pid) / "task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def _rss_kib(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples every ``interval_s`` in a thread; ``peak_mib`` is the largest resident set
    any one of the processes had (per worker, as the target is stated)."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    @property
    def available(self) -> bool:
        return (PROC / str(self.pid) / "status").exists()

    @property
    def peak_mib(self) -> float:
        return round(self.peak_kib / 1024, 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [self.pid]
            for pid in pids:  # grows as children are found: the whole tree
                pids += [c for c in _children(pid) if c not in pids]
            self.peak_kib = max([self.peak_kib, *(_rss_kib(p) for p in pids)])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
