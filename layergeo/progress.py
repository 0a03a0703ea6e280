"""Progress that shows in a terminal and in a log.

On a terminal, a tqdm bar on stderr. Anywhere else (a log file, nohup, CI, a pipe) a plain line on
stdout when the work starts, every ``LAYERGEO_PROGRESS_SECONDS`` seconds (default 60) and when it
ends: ``train forward: step 120/320 (38%), 45 s, ~75 s left, loss=0.512 dev_acc=0.710``. stderr
stays for errors, so a failing command still ends with its one-line message.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI") != "true"


def log_interval() -> float:
    return float(os.environ.get("LAYERGEO_PROGRESS_SECONDS", "60"))


def eta(done: int, total: int, elapsed: float) -> str:
    """``~75 s left`` (or minutes / hours) from the mean time per unit so far; empty before the first unit."""
    if done <= 0 or total <= done:
        return ""
    left = elapsed / done * (total - done)
    return f", ~{left:.0f} s left" if left < 120 else f", ~{left / 60:.0f} min left" if left < 7200 else f", ~{left / 3600:.1f} h left"


class LogBar:
    """The part of tqdm's interface the loops use, printing plain lines instead of redrawing a bar."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step", interval: float | None = None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.start_n, self.t0 = initial, time.monotonic()
        self.interval = log_interval() if interval is None else interval
        self.postfix: dict[str, str] = {}
        self.last = self.t0
        self._line("start" if initial == 0 else "resumed")

    def _line(self, event: str = "") -> None:
        elapsed = time.monotonic() - self.t0
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        text = (f"{self.desc}: {self.unit} {self.n}/{self.total}{share}, {elapsed:.0f} s"
                f"{eta(self.n - self.start_n, self.total - self.start_n, elapsed)}" + (f", {extra}" if extra else ""))
        print(f"{text}{f' [{event}]' if event else ''}", flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix.update({k: str(v) for k, v in values.items() if v is not None})

    def close(self) -> None:
        self._line("done" if self.n >= self.total else "stopped")


class _Silent:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, initial: int = 0, unit: str = "step", enabled: bool = True):
    """A tqdm bar on a terminal, a :class:`LogBar` elsewhere, nothing when ``enabled`` is false."""
    if not enabled:
        return _Silent()
    if interactive():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LogBar(total, desc, initial, unit)
