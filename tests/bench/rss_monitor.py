"""Peak resident memory of a process and all its descendants, sampled in a background thread."""

from __future__ import annotations

import contextlib
import threading

import psutil


class RssMonitor:
    """Sums RSS over the tree rooted at `pid` every `interval_s`; `peak_bytes` is the largest sum seen.

    Sampling can miss a peak shorter than the interval. A page shared between processes counts once in
    each; `proportional` sums PSS instead (a shared page split between its processes: what the tree
    really holds), which reads each process's page map, so it is slower.
    """

    def __init__(self, pid: int, interval_s: float = 0.2, proportional: bool = False):
        self.pid = pid
        self.interval_s = interval_s
        self.proportional = proportional
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):  # exited between listing and reading
                total += p.memory_full_info().pss if self.proportional else p.memory_info().rss
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self._stop.wait(self.interval_s)
