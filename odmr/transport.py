"""Whether a server can take a message as it is: the one decision, shared by delivery
to customers and the bounce relay, so both refuse the same mail with the same reply.

odmrd converts nothing (RFC 6152 §3, RFC 6531 §3.2, no RFC 6857 downgrade): mail that
needs SMTPUTF8 or 8BITMIME meets a server without it with a 553/554 per recipient.
Only the decision is here; each caller speaks SMTP and records the refusal itself.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional

from odmr.replies import Reply
from odmr.spool import Message


def untransportable(message: Message, rcpts: List[str], text: Callable[[], Iterator[bytes]],
                     smtputf8: bool, eightbit: bool, server: str) -> Optional[Reply]:
    """The refusal for every recipient when `server` (without SMTPUTF8 or 8BITMIME, as
    told) cannot take the message as it is, else None: odmrd converts nothing (RFC 6152
    §3, RFC 6531 §3.2, no RFC 6857 downgrade). `text` gives the text's chunks; it is
    read only when the answer depends on it."""
    if not smtputf8 and needs_smtputf8(message, rcpts, text):
        return (553, "5.6.7 %s does not support SMTPUTF8" % server)
    if message.envelope.body == "8BITMIME" and not eightbit:
        chunks = text()             # BODY=8BITMIME mail is often plain ASCII: look
        try:
            if not all(chunk.isascii() for chunk in chunks):
                return (554, "5.6.3 %s does not support 8BITMIME; conversion to 7 bit "
                             "not supported" % server)
        finally:
            _close(chunks)
    return None


def needs_smtputf8(message: Message, rcpts: List[str], text: Callable[[], Iterator[bytes]]) -> bool:
    """UTF-8 addresses, or (RFC 6532) UTF-8 header fields in a message that came with
    SMTPUTF8 (in the text's first chunk): neither may reach a server without SMTPUTF8."""
    env = message.envelope
    if not env.sender.isascii() or not all(r.isascii() for r in rcpts):
        return True
    if not env.smtputf8:
        return False
    chunks = text()
    try:
        head = next(chunks, b"")
    finally:
        _close(chunks)
    end = head.find(b"\r\n\r\n")
    return not (head if end < 0 else head[:end]).isascii()


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)      # a generator holding the file open
    if close is not None:
        close()
