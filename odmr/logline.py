"""One log line per event, whatever a peer put into it.

Addresses, EHLO names, AUTH user names and replies come from the network and
end up in log messages. Any character that could end a line (CR, LF, NEL,
U+2028/U+2029, vertical tab, form feed …) or disguise one (bidi overrides and
isolates, zero-width and other invisible format characters, C0/C1 controls,
DEL) is written as a visible escape, so a log reader or a syslog parser
always sees exactly the event that happened. Used by every log handler of the
provider (stderr, syslog, log file) and of `odmrd fetch`.
"""
from __future__ import annotations

import logging
import os
import time

_NAMED = {"\n": " | ", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return "\\x%02x" % code
    if code < 0x10000:
        return "\\u%04x" % code
    return "\\U%08x" % code


def escape_for_log(text: str) -> str:
    """`text` with every character Python does not call printable escaped
    (categories Cc, Cf, Cs, Co, Cn, Zl, Zp and spaces other than U+0020);
    a line break becomes " | ", so a multi-line message stays one line."""
    if text.isprintable():          # the common case: one pass in C
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


class OneLineFormatter(logging.Formatter):
    """A Formatter whose every record, arguments and traceback included, is one safe line."""

    _stamped = (-1, "")     # (second, its text), one tuple: threads read it whole

    def format(self, record: logging.LogRecord) -> str:
        return escape_for_log(super().format(record))

    def formatTime(self, record: logging.LogRecord, datefmt=None) -> str:
        """The time, formatted once per second: a busy intake logs a line per message."""
        if not datefmt:
            return super().formatTime(record, datefmt)
        second, text = self._stamped
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime(datefmt, self.converter(second))
            self._stamped = (second, text)
        return text


# -- the pid a daemon's line names ----------------------------------------------------------
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def log_as(pid: int) -> None:
    """Log lines name this pid: an intake worker logs as the daemon (the pid file's)."""
    _pid[0] = pid


class DaemonLineFormatter(OneLineFormatter):
    """Log lines never span lines: nothing from a peer can forge or disguise entries."""

    def format(self, record: logging.LogRecord) -> str:
        if record.process is None:          # logProcesses is off: the pid is cached, not asked for
            record.process = _pid[0]
        return super().format(record)


__all__ = ["escape_for_log", "OneLineFormatter", "DaemonLineFormatter", "log_as"]
