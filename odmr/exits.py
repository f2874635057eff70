"""Exit codes, from sysexits.h: one table for every command (SPEC §2).

`os.EX_*` has the same values but exists only on Unix builds of Python and
lacks nothing we need except a single place to read them all.
"""
from typing import NoReturn

EX_OK = 0
EX_USAGE = 64          # bad flags
EX_DATAERR = 65        # bad input (a message, an address, a corrupt spool file)
EX_NOINPUT = 66        # a file named on the command line cannot be read
EX_NOUSER = 67         # recipient domain not hosted; unknown account
EX_UNAVAILABLE = 69    # a dependency or a service is missing (ATRN not offered, no idna)
EX_SOFTWARE = 70       # a bug: internal error
EX_OSERR = 71          # the system refused (a port cannot be bound)
EX_CANTCREAT = 73      # a file or directory cannot be created
EX_IOERR = 74          # reading or writing failed
EX_TEMPFAIL = 75       # try again later; an MTA's pipe transport retries
EX_PROTOCOL = 76       # the peer broke the protocol, or its certificate failed
EX_NOPERM = 77         # refused: authentication, permissions
EX_CONFIG = 78         # configuration error

# LSB init-script status codes (`odmrd status`, the init scripts; SPEC §2, §8)
LSB_RUNNING, LSB_NOT_RUNNING, LSB_UNKNOWN = 0, 3, 4


def leave_forked_process(code: int) -> NoReturn:
    """A forked process (the detached daemon, an intake worker) ends here, never back in
    its parent's code: the log is flushed, then os._exit (no atexit, no stdio of the
    parent flushed a second time)."""
    import logging
    import os
    try:
        logging.shutdown()
    finally:
        os._exit(code)
