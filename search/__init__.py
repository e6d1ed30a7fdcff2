"""cnnsearch: hyperparameter search for CNN image classifiers."""

import signal
import threading

__version__ = "0.1.0"

# A SIGINT in a worker's first second lands while Python imports (torch takes a second or two),
# before the worker's own handlers exist (search.worker.stop_on_signals). Python's default
# handler raises KeyboardInterrupt there, and an import's `except BaseException`, a finalizer or
# a garbage-collector callback can swallow it: the worker then ran the whole study (seen in CI).
# This handler does the same as Python's but records the signal first, so stop_on_signals
# honours it on entry whatever happened to the exception. Only where SIGINT is still Python's
# default (not where a host program, or a shell that started us in the background, chose).
early_signals: list[int] = []


def _record_then_interrupt(signum, frame):
    early_signals[:] = [signum]
    raise KeyboardInterrupt


if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _record_then_interrupt)
