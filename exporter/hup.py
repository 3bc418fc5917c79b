"""SIGHUP from the first moment: a reload asked for while the exporter starts
must not kill it (the default action of SIGHUP). This module imports nothing
heavy, so ``python -m exporter`` catches SIGHUP before loading aiohttp, the
config or the store; :func:`exporter.cli.run` runs the reload once started."""

from __future__ import annotations

import signal
from types import FrameType

_asked = False


def _remember(_signum: int, _frame: FrameType | None) -> None:
    global _asked
    _asked = True


def catch_early() -> None:
    """Remember a SIGHUP until the event loop takes the signal over."""
    if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGHUP, _remember)


def take_early() -> bool:
    """Whether a SIGHUP came before the event loop took the signal over (once)."""
    global _asked
    asked, _asked = _asked, False
    return asked
