"""`odmrd enqueue`: spool one message from stdin, as an MTA's pipe transport would.

Like `sendmail -oi`: a line with a single dot is content, not an end marker.
Line endings are normalised to CRLF while streaming to disk.
"""
from __future__ import annotations

import email.utils
import os
import pwd
import time
from typing import BinaryIO, Dict, List, Tuple

from odmr.names import address_is_safe, mailbox_key
from odmr.runtime import Runtime
from odmr.spool import Envelope, Recipient, SpoolError
from odmr.syntax import for_clause, printable, split_source_route

EX_DATAERR = 65
EX_NOUSER = 67
EX_IOERR = 74
EX_TEMPFAIL = 75


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
    if not address_is_safe(sender):
        raise EnqueueError("sender %r contains characters not allowed in an address" % sender, EX_DATAERR)
    if sender and "@" not in sender:
        raise EnqueueError("sender %r needs a domain" % sender, EX_DATAERR)
    routed = sender and runtime.sender_routing(sender)
    if routed:
        raise EnqueueError("sender <%s> is in a hosted domain and carries a route: %s"
                           % (printable(sender), routed), EX_NOUSER)
    by_domain: Dict[str, List[str]] = {}
    mailboxes = set()
    for address in recipients:
        path = address.strip().lstrip("<").rstrip(">")
        try:
            route, address = split_source_route(path)
        except ValueError:
            raise EnqueueError("recipient <%s>: source route without ':'" % printable(path),
                               EX_DATAERR) from None
        domain, code, text = runtime.classify_recipient(address, utf8_allowed=True, route=route)
        if domain is None:
            status = EX_NOUSER if code in (550, 553) else EX_DATAERR
            reason = text.split(" ", 1)[1]
            if reason == "Relaying denied":     # an MTA's bounce should say why in plain words
                reason = "domain %s is not hosted here" % printable(address.rpartition("@")[2])
            raise EnqueueError("recipient <%s>: %s" % (printable(path), reason), status)
        if not runtime.quota_ok(domain):
            raise EnqueueError("<%s>: domain %s is over quota" % (address, domain), EX_TEMPFAIL)
        key = mailbox_key(address, domain)
        if key not in mailboxes:
            mailboxes.add(key)
            by_domain.setdefault(domain, []).append(key)     # with the domain's A-label
    utf8 = not sender.isascii() or not all(a.isascii() for group in by_domain.values() for a in group)
    now = time.time()
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    envelopes = {d: Envelope(sender=sender, recipients=[Recipient(a) for a in addrs], smtputf8=utf8,
                             body="8BITMIME", arrival=now, client="local user %s" % user)
                 for d, addrs in by_domain.items()}
    hostname = runtime.hostname

    def prefix(domain: str, msg_id: str) -> bytes:
        rcpts = by_domain[domain]
        text = "Received: by %s (odmrd enqueue, uid %d) id %s" % (hostname, os.getuid(), msg_id)
        text += for_clause(rcpts)
        return (text + ";\r\n\t%s\r\n" % email.utils.formatdate(localtime=True)).encode("utf-8")

    limit = runtime.settings.smtp.max_message_size
    try:
        incoming = runtime.spool.begin(envelopes, prefix)
    except SpoolError as exc:
        raise EnqueueError(str(exc), EX_TEMPFAIL) from None
    size = 0
    last = b"\n"
    try:
        for piece in _normalise(stream):
            size += len(piece)
            if size > limit:
                incoming.abort()
                raise EnqueueError("message exceeds the size limit of %d bytes" % limit, EX_DATAERR)
            incoming.write(piece)
            last = piece[-1:] or last
        if size == 0:
            incoming.abort()
            raise EnqueueError("empty message", EX_DATAERR)
        if last != b"\n":
            incoming.write(b"\r\n")
        return incoming.commit()
    except SpoolError as exc:
        incoming.abort()
        raise EnqueueError(str(exc), EX_TEMPFAIL) from None   # the MTA keeps it and retries
    except OSError as exc:
        incoming.abort()
        raise EnqueueError("reading stdin: %s" % exc.strerror, EX_IOERR) from None
