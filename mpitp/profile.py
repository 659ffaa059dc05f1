"""Where a forward's time goes: wall time per category, for the benchmark's per-token breakdown.

``Model.forward`` calls ``mark(category)`` at the end of each step, charging the time since the previous
mark to that category. Without a profile the marks go to ``NO_PROFILE``, whose methods do nothing.
"""

import time

CATEGORIES = ("matmul", "attention", "allreduce", "lm_head", "other")


class Profile:
    """Accumulates seconds per category over any number of forwards."""

    def __init__(self):
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self._last = None

    def start(self):
        self._last = time.perf_counter()

    def mark(self, category):
        now = time.perf_counter()
        self.seconds[category] += now - self._last
        self._last = now


class _NoProfile:
    def start(self):
        pass

    def mark(self, category):
        pass


NO_PROFILE = _NoProfile()
