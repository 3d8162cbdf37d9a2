"""How the library tells a person what it is doing: one place instead of ``print`` in every stage.

Stages call :func:`report` with their name and a line. The line goes to the ``meddr_ray.progress.<stage>``
logger at INFO. Unless :func:`configure` was called first, the first report in a process installs a handler that
writes ``[<stage>] <line>`` to standard output, in the driver and in Ray workers alike (Ray forwards a worker's
output to the driver and the job logs). The CLI calls :func:`configure` to choose between those lines and
silence; an application with its own logging calls ``configure(stdout=False)``. The modules' own diagnostic
logging (``logging.getLogger(__name__)``) is not progress and goes wherever the application's logging sends it.
"""

from __future__ import annotations

import logging
import sys

ROOT = "meddr_ray.progress"


class _StdoutLines(logging.Handler):
    """Writes each record as one line to the *current* ``sys.stdout`` (looked up at every record, so that a
    redirected or captured stdout receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # a closed stream must not stop a stage
            self.handleError(record)


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else record.name
        return f"[{stage}] {record.getMessage()}"


_configured = False


def configure(quiet: bool = False, stdout: bool = True) -> None:
    """Show progress lines on standard output (the default), or only warnings and errors (``quiet``).
    ``stdout=False``: add no handler of ours; the application's own handlers on ``meddr_ray.progress`` (or, by
    propagation, the root logger) receive the reports."""
    global _configured
    root = logging.getLogger(ROOT)
    ours = [h for h in root.handlers if isinstance(h, _StdoutLines)]
    if stdout and not ours:
        handler = _StdoutLines()
        handler.setFormatter(_StageFormatter())
        root.addHandler(handler)
    elif not stdout:
        for h in ours:
            root.removeHandler(h)
    root.propagate = not stdout  # our lines on stdout are the person's view; not a second copy through root
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    _configured = True


def report(stage: str, message: str) -> None:
    """One progress line from ``stage`` (``bootstrap``, ``train``, ``pipeline``, ...). The first report in a
    process that nothing configured yet (a Ray worker, a notebook) shows lines on standard output."""
    if not _configured:
        configure()
    logging.getLogger(f"{ROOT}.{stage}").info(message)
