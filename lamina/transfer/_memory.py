"""Peak memory of a piece of work on CPU: the rise of the process's resident-set high-water mark.

Linux keeps the peak resident set (VmHWM in /proc/self/status) and lets a
process reset it to the current size (writing 5 to /proc/self/clear_refs), so
the peak of one stage is VmHWM after it minus VmRSS before it. torch's CPU
allocations do not pass through Python's allocator, so tracemalloc would not
see them; RSS does. Where the reset is not allowed, a 10 ms sampling thread
stands in (it can miss a peak shorter than that). On CUDA, torch's own peak
counter is used.
"""

from __future__ import annotations

import threading
import time

import torch


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.bytes`` (peak rise) and ``m.method``."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.bytes, self.method = 0, ""

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated rise"
            return self
        self._start = _status("VmRSS") or 0
        self._thread = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "RSS high-water rise (Linux VmHWM reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "RSS sampled every 10 ms (peak rise)"
            self._peak, self._stop = self._start, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _status("VmRSS") or 0)
            time.sleep(0.01)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = max(0, torch.cuda.max_memory_allocated() - self._start)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.bytes = max(0, self._peak - self._start)
        else:
            self.bytes = max(0, (_status("VmHWM") or 0) - self._start)
        return False
