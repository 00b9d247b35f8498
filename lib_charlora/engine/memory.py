"""How much memory a training takes beyond what was in use when it began (the loaded model).

On a CUDA device: the peak of torch's allocated memory (what decides whether it fits the card).
Elsewhere: the peak of the process's resident memory, sampled by a thread every ``interval`` s
(reads the OS counter only: it runs no torch op, so it does not slow torch in other threads).
"""
import os
import threading

import torch

MB = 2 ** 20


def resident_bytes():
    """The process's resident set size in bytes, or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:  # Windows, macOS: the WebUI ships psutil
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001 - no way to measure is not an error
        return None


def memory_text(mb):
    """'840 MB', '3.2 GB'."""
    return f"{mb:.0f} MB" if mb < 1024 else f"{mb / 1024:.1f} GB"


class PeakMemory:
    """``with PeakMemory(device) as mem: ...``; ``mem.peak_mb()``: the peak so far above the start (MB),
    None where it cannot be measured."""

    def __init__(self, device, interval=0.02):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.interval = interval
        self._base = self._peak = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = resident_bytes()
            if self._base is not None:
                self._thread = threading.Thread(target=self._sample, name="charlora-memory", daemon=True)
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._read()

    def _read(self):
        now = resident_bytes()
        if now is not None and now > self._peak:
            self._peak = now

    def peak_mb(self):
        if self._base is None:
            return None
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._read()
            peak = self._peak
        return max(0.0, (peak - self._base) / MB)

    def __exit__(self, *exc):
        self.final_mb = self.peak_mb()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False
