"""Run ``layergeo`` in this process and SIGKILL it at a chosen point (for the resume tests).

    python tests/kill_driver.py POINT -- layergeo arguments...

POINT is one of
  step:NAME:N          after optimiser step N of the run whose directory is called NAME (the progress bar's name)
  before-replace:TEXT  just before an atomic rename whose source path contains TEXT (e.g. ``.last.tmp-``:
                       the old ``last`` checkpoint renamed aside, the new one not yet in place)
  after-replace:TEXT   just after an atomic rename whose target path ends with TEXT (e.g. ``teacher/results.json``)
A kill -9 leaves no chance to clean up: what the run directory holds then is what a real kill leaves.
"""

from __future__ import annotations

import os
import signal
import sys


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, rest = point.partition(":")
    if kind == "step":
        import layergeo.loop as train

        name, _, count = rest.rpartition(":")
        make_bar = train.progress_bar

        def killing_bar(total, desc, initial=0, **kwargs):
            bar = make_bar(total, desc, initial=initial, **kwargs)
            update, steps = bar.update, [initial]

            def counted(n=1):
                update(n)
                steps[0] += n
                if desc == name and steps[0] >= int(count):
                    _kill()

            bar.update = counted
            return bar

        train.progress_bar = killing_bar
        return
    import layergeo.runs as runs

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if kind == "before-replace" and rest in str(src):
            _kill()
        real_replace(src, dst, *args, **kwargs)
        if kind == "after-replace" and str(dst).endswith(rest):
            _kill()

    runs.os = type(sys)("os_with_kill")
    runs.os.__dict__.update(os.__dict__)
    runs.os.replace = replace


if __name__ == "__main__":
    point, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: kill_driver.py POINT -- ARGS"
    install(point)
    from layergeo.cli import main

    sys.exit(main(argv))
