"""Ctrl-C (SIGINT) and SIGTERM (``scancel``, preemption, ``kill``) for the console scripts: the usual exit statuses,
130 and 143, and one line instead of a traceback.

Importing this module first thing in a console script (``cli``, ``sweep``) makes a signal that arrives while the
heavy libraries are still being imported end the process at once, quietly (nothing has run yet). ``install`` then
turns SIGINT into ``KeyboardInterrupt`` and SIGTERM into ``Terminated`` (a ``KeyboardInterrupt``, so that
Lightning's trainer runs its interrupt handling: callbacks' ``on_exception``, loggers finalized, child processes
stopped). ``received()`` tells which signal stopped the run, also after Lightning turned the interrupt into
``sys.exit(1)``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CONSOLE_SCRIPTS = {"lightning-repair", "lightning-repair-sweep"}
MODULES = {"lightning_repair.cli", "lightning_repair.sweep"}
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated (SIGTERM)"}

_received: int | None = None
_DEFAULT = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
_note: str | Callable[[], str] = "nothing ran yet"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived."""


def received() -> int | None:
    """The signal (SIGINT or SIGTERM) that stopped this run, if one did."""
    return _received


def exit_status(signum: int) -> int:
    return EXIT_STATUS[signum]


def describe(signum: int) -> str:
    return NAMES[signum]


def note() -> str:
    """What the run saved so far and how to resume it, as last set by ``set_note``."""
    return _note() if callable(_note) else _note


def set_note(text: str | Callable[[], str]) -> None:
    """Say what is saved if the run stops now, and how to resume it (a callable is asked when a signal arrives)."""
    global _note
    _note = text


@contextmanager
def handled() -> Iterator[None]:
    """While active, SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, both remembered for ``received``;
    the previous handlers come back at the end."""
    global _received, _note
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    _received, _note = None, "nothing ran yet"
    previous = {s: signal.getsignal(s) for s in EXIT_STATUS}
    for s in EXIT_STATUS:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            # the start-up handler's "nothing ran" would be wrong now: back to Python's own
            signal.signal(s, _DEFAULT[s] if handler is _quit_during_startup else handler)


def _raise(signum, _frame) -> None:
    global _received
    _received = signum
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def _quit_during_startup(signum, _frame) -> None:
    prog = Path(sys.argv[0]).name if Path(sys.argv[0]).name in CONSOLE_SCRIPTS else "lightning-repair"
    print(f"{prog}: {NAMES[signum]} while starting; nothing ran", file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS[signum])  # nothing to clean up: the libraries are still being imported


def _running_as_console_script() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return Path(sys.argv[0] if sys.argv else "").name in CONSOLE_SCRIPTS or getattr(spec, "name", None) in MODULES


# only when this process is one of the console scripts: importing the package elsewhere (tests, notebooks) keeps
# the host's own handlers
if (
    threading.current_thread() is threading.main_thread()
    and _running_as_console_script()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, _quit_during_startup)
    signal.signal(signal.SIGTERM, _quit_during_startup)
