"""`odmrd enqueue`: spool one message from stdin, as an MTA's pipe transport would.

Like `sendmail -oi`: a line with a single dot is content, not an end marker.
Line endings are normalised to CRLF while streaming to disk.
"""
from __future__ import annotations

import logging
import os
import pwd
from typing import BinaryIO, List, Tuple

from odmr import replies
from odmr.exits import EX_DATAERR, EX_IOERR, EX_NOUSER, EX_TEMPFAIL
from odmr.names import address_is_safe
from odmr.runtime import Runtime
from odmr.spool import SpoolError
from odmr.hops import TooManyHops
from odmr.submission import Decision, OverQuota, Submission, TooBig, accept_sender
from odmr.syntax import local_received_header, printable, split_source_route

log = logging.getLogger("odmrd.enqueue")


class EnqueueError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _normalise(stream: BinaryIO, chunk: int = 65536):
    """Yield the input with every line ending turned into CRLF."""
    carry_cr = False
    while True:
        data = stream.read(chunk)
        if not data:
            if carry_cr:
                yield b"\r\n"
            return
        if carry_cr:
            data = b"\r" + data
            carry_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            carry_cr = True
        yield data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def enqueue(runtime: Runtime, sender: str, recipients: List[str], stream: BinaryIO) -> List[Tuple[str, str]]:
    """Spool the message for every recipient's domain; returns [(domain, id)]."""
    sender = sender.strip().lstrip("<").rstrip(">")
    try:
        _, sender = split_source_route(sender)      # ignored, as intake's MAIL does (RFC 5321 §C)
    except ValueError:
        raise EnqueueError("sender <%s>: source route without ':'" % printable(sender, 100),
                           EX_DATAERR) from None
    if not address_is_safe(sender):
        raise EnqueueError("sender %r contains characters not allowed in an address" % sender, EX_DATAERR)
    decision = accept_sender(runtime.hosting, sender)
    if not decision.accepted:
        raise EnqueueError("sender <%s>: %s" % (printable(sender, 100), decision.reason),
                           exit_code(decision))
    submission = Submission(sender, body="8BITMIME")
    for address in recipients:
        path = address.strip().lstrip("<").rstrip(">")
        try:
            route, address = split_source_route(path)
        except ValueError:
            raise EnqueueError("recipient <%s>: source route without ':'" % printable(path),
                               EX_DATAERR) from None
        decision = submission.accept_recipient(runtime.hosting, address, route, utf8_allowed=True)
        if decision.domain is None:
            reason = decision.reason
            if decision.reply == replies.RELAYING_DENIED:   # an MTA's bounce says why in plain words
                reason = "domain %s is not hosted here" % printable(address.rpartition("@")[2])
            raise EnqueueError("recipient <%s>: %s" % (printable(path), reason),
                               exit_code(decision))
        submission.add(decision.address, decision.domain)
    submission.smtputf8 = not sender.isascii() or not all(a.isascii() for a in submission.recipients)
    return _spool(runtime, submission, stream)


def exit_code(decision: Decision) -> int:
    """README's scheme for a refused sender or recipient: 67 for an address that is not
    ours to take (not hosted, no such user, a route), 65 for one that is malformed or too
    long, 75 for what may pass later."""
    if decision.code < 500:
        return EX_TEMPFAIL
    if decision.code == 501 or decision.status in ("5.1.3", "5.1.7"):
        return EX_DATAERR
    return EX_NOUSER


def _spool(runtime: Runtime, submission: Submission, stream: BinaryIO) -> List[Tuple[str, str]]:
    """Stream stdin into the queue; stop at the first thing that keeps it from being stored."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    hostname = runtime.hostname
    spooling = submission.start(runtime.spool, "local user %s" % user,
                                lambda msg_id, rcpts: local_received_header(hostname, msg_id, rcpts),
                                runtime.settings.smtp.max_message_size, hostname,
                                runtime.settings.smtp.max_received_headers, quotas=runtime.hosting)
    if spooling.failure is not None:             # before reading: the MTA keeps it and retries
        raise EnqueueError(str(spooling.failure), EX_TEMPFAIL)
    try:
        for piece in _normalise(stream):
            spooling.write(piece)
            if spooling.failure is not None:
                break
        else:
            if spooling.size == 0:
                spooling.abort()
                raise EnqueueError("empty message", EX_DATAERR)
            spooling.end_line()
        stored = spooling.commit()
    except TooBig as exc:
        raise EnqueueError(str(exc), EX_DATAERR) from None
    except TooManyHops as exc:
        raise EnqueueError(str(exc).split(" ", 1)[1], EX_DATAERR) from None
    except (OverQuota, SpoolError) as exc:
        raise EnqueueError(str(exc), EX_TEMPFAIL) from None   # the MTA keeps it and retries
    except OSError as exc:
        spooling.abort()
        raise EnqueueError("reading stdin: %s" % exc.strerror, EX_IOERR) from None
    spooling.log_accepted(log, "enqueue", stored, submission.sender, "by=%s" % user)
    return stored
