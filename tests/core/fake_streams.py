"""Test doubles for progress displays: a stream that says it is a terminal, and a clock the
test moves by hand (shared by tests/core/test_progress.py and tests/bench/test_progress.py)."""

import io


class TTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now
