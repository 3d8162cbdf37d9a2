"""How the library tells a person what it is doing: one place instead of ``print`` in every stage.

Stages call :func:`report` with their name and a line. The line goes to the ``meddr_ray.progress.<stage>``
logger at INFO, so an application that configures logging decides where it goes. When nothing has configured the
``meddr_ray.progress`` logger, the first report installs a handler that writes ``[<stage>] <line>`` to standard
output, in the driver and in Ray workers alike (Ray forwards a worker's output to the driver and the job logs).
The CLI calls :func:`configure` to choose between those lines and silence. The modules' own diagnostic logging
(``logging.getLogger(__name__)``) is not progress and goes wherever the application's logging sends it.
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


def configure(quiet: bool = False) -> None:
    """Show progress lines on standard output (the default), or only warnings and errors (``quiet``)."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _StdoutLines) for h in root.handlers):
        handler = _StdoutLines()
        handler.setFormatter(_StageFormatter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.WARNING if quiet else logging.INFO)


def report(stage: str, message: str) -> None:
    """One progress line from ``stage`` (``bootstrap``, ``train``, ``pipeline``, ...)."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        configure()
    logging.getLogger(f"{ROOT}.{stage}").info(message)
