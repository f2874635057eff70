"""Delivery status notifications (RFC 3464) and where they go.

A DSN for a sender in a hosted domain is spooled for that domain like any
other mail; one for anybody else waits in the OUTBOUND queue, which the
maintenance thread hands to `bounce_relay`. A null sender (<>) never gets one,
so a bounce can never bounce.

The report is written out by hand rather than through the email package:
its structure is fixed, and the original headers must be returned as they
were stored (bytes, CRLF), not re-folded.
"""
from __future__ import annotations

import base64
import email.utils
import logging
import re
import secrets
from typing import Dict, List, Optional, Tuple

from odmr.folding import break_long_lines
from odmr.names import normalize_domain, split_address
from odmr.spool import OUTBOUND, Message, Spool
from odmr.submission import Submission, store

log = logging.getLogger("odmrd.bounce")

_STATUS = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
RETURN_FULL_LIMIT = 1024 * 1024      # RET=FULL returns the whole message up to this size
HEADERS_LIMIT = 65536


def status_of(reply: str, default: str) -> str:
    """The enhanced status code (RFC 3463) in a reply, or one derived from its class."""
    m = _STATUS.match(reply or "")
    if m:
        return m.group(1)
    if reply[:1] in ("4", "5") and reply[:3].isdigit():
        return reply[0] + default[1:]
    return default


def _original(message: Message, full: bool) -> Tuple[bytes, bool]:
    """The returned part and whether it is the whole message (RET=FULL, small) or its headers."""
    limit = RETURN_FULL_LIMIT if full else HEADERS_LIMIT
    with message.open_data() as fh:
        data = fh.read(limit + 1)
    if full and len(data) <= limit:
        return data, True
    return _headers_of(data), False


def _unxtext(text: str) -> str:
    """RFC 3461 §4: ENVID and ORCPT travel as xtext (`+40` for `@`); a DSN shows them
    decoded (controls, which a header cannot carry, as `?`)."""
    decoded = re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)
    return "".join(c if c.isprintable() else "?" for c in decoded)


def _clean(text: str) -> str:
    """One line of header-safe text (customer replies may carry anything)."""
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def build_dsn(hostname: str, message: Message, results: Dict[str, str], action: str = "failed") -> bytes:
    """A multipart/report DSN; `results` maps each recipient to the customer's reply (or a reason).

    Always 7-bit with lines of at most 998 octets (a UTF-8 part is base64, RFC 6533
    §6.2-6.3), so any relay or customer can take it, with or without 8BITMIME."""
    env = message.envelope
    boundary = "=_odmrd_%s" % secrets.token_hex(12)
    orcpt = {r.address: r.orcpt for r in env.recipients}
    # RFC 6533: a report about an internationalised address is a global one, and names
    # it with the utf-8 address type; raw UTF-8 never goes into an rfc822 field
    international = not all(r.isascii() and orcpt.get(r, "").isascii() for r in results)
    report_type = "global-delivery-status" if international else "delivery-status"
    original, whole = _original(message, env.ret.upper() == "FULL")
    if whole and not original.isascii():             # message/rfc822 cannot be encoded:
        original, whole = _headers_of(original), False     # the headers say enough
    out = [_crlf_join(_dsn_headers(hostname, env.sender, action, boundary, report_type)),
           b"\r\n\r\nThis is a MIME-encapsulated delivery status notification.\r\n\r\n",
           _part(boundary, "text/plain; charset=utf-8", _crlf_join(_intro(hostname, results, action))),
           _part(boundary, "message/" + report_type,
                 _crlf_join(_status_fields(hostname, message, results, action))),
           _part(boundary, _returned_type(original, whole), original),
           ("--%s--\r\n" % boundary).encode()]
    return b"".join(out)


def _part(boundary: str, content_type: str, payload: bytes) -> bytes:
    """One body part: as it is when 7-bit, else base64 (for UTF-8 text and global types)."""
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    if payload.isascii():
        encoding, payload = "7bit", break_long_lines(payload)
    else:
        encoding = "base64"
        payload = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return ("--%s\r\nContent-Type: %s\r\nContent-Transfer-Encoding: %s\r\n\r\n"
            % (boundary, content_type, encoding)).encode() + payload + b"\r\n"


def _headers_of(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else data[:HEADERS_LIMIT]


def _dsn_headers(hostname: str, sender: str, action: str, boundary: str,
                 report_type: str) -> List[str]:
    return [
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % hostname,
        "To: <%s>" % sender,
        "Subject: %s" % _SUBJECTS[action],
        "Date: %s" % email.utils.formatdate(localtime=True),
        "Message-ID: %s" % email.utils.make_msgid(domain=hostname),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=%s;\r\n boundary="%s"' % (report_type, boundary),
    ]


_SUBJECTS = {"failed": "Undelivered Mail Returned to Sender",
             "delayed": "Delayed Mail (still being retried)",
             "relayed": "Delivery Status Notification (relayed)"}


def _intro(hostname: str, results: Dict[str, str], action: str) -> List[str]:
    """The human-readable part."""
    if action == "relayed":
        intro = ["This is the mail system at %s." % hostname, "",
                 "Your message was handed to the following recipients' server, which does not",
                 "send delivery notices itself: this is the last notice you will get.", ""]
    elif action == "failed":
        intro = ["This is the mail system at %s." % hostname, "",
                 "Your message could not be delivered to the following recipients.",
                 "This is a permanent error; the message has been removed from the queue.", ""]
    else:
        intro = ["This is the mail system at %s." % hostname, "",
                 "Your message has not been delivered yet to the following recipients.",
                 "It is still queued and will be delivered when the recipient's server collects",
                 "it; no action is needed. You will be told if it is finally returned.", ""]
    return intro + ["<%s>: %s" % (rcpt, _clean(reply)) for rcpt, reply in results.items()]


def _status_fields(hostname: str, message: Message, results: Dict[str, str], action: str) -> List[str]:
    """The machine-readable part (RFC 3464 §2.2, §2.3): one group per recipient."""
    env = message.envelope
    orcpt = {r.address: r.orcpt for r in env.recipients}
    status: List[str] = ["Reporting-MTA: dns; %s" % hostname]
    if env.envid:
        status.append("Original-Envelope-Id: %s" % _clean(_unxtext(env.envid)))
    status.append("Arrival-Date: %s" % email.utils.formatdate(env.arrival, localtime=True))
    default = {"failed": "5.0.0", "relayed": "2.0.0"}.get(action, "4.0.0")
    for rcpt, reply in results.items():
        status.append("")
        if orcpt.get(rcpt):
            status.append("Original-Recipient: %s" % _clean(_unxtext(orcpt[rcpt])))
        status += ["Final-Recipient: %s; %s" % ("rfc822" if rcpt.isascii() else "utf-8", rcpt),
                   "Action: %s" % action,
                   "Status: %s" % status_of(reply, default),
                   "Diagnostic-Code: %s; %s" % ("smtp" if reply[:3].isdigit() else "x-odmrd",
                                                _clean(reply)[:900])]
    return status


def _crlf_join(lines: List[str]) -> bytes:
    return "\r\n".join(lines).encode("utf-8")


def _returned_type(original: bytes, whole: bool) -> str:
    """The returned part's type: RFC 6532's global types when its header is UTF-8."""
    end = original.find(b"\r\n\r\n")
    header = original if end < 0 else original[:end]
    if header.isascii():
        return "message/rfc822" if whole else "text/rfc822-headers"
    return "message/global" if whole else "message/global-headers"


def send_dsn(spool: Spool, hosted: frozenset, hostname: str, message: Message,
             results: Dict[str, str], action: str = "failed") -> Optional[str]:
    """Spool a DSN for `message`; returns its id, or None when the sender is <>."""
    sender = message.envelope.sender
    if not sender:
        log.info("bounce: %s/%s: null sender, no DSN (%s) for %s", message.domain, message.id,
                 action, ",".join(results))
        return None
    if not results:
        return None
    data = build_dsn(hostname, message, results, action)
    try:
        domain = normalize_domain(split_address(sender)[1])
    except ValueError:
        domain = ""
    queue = domain if domain and domain in hosted else OUTBOUND
    # 8BITMIME only when the report really has 8-bit text: a 7-bit one goes anywhere
    dsn = Submission("", smtputf8=not sender.isascii(), body="7BIT" if data.isascii() else "8BITMIME")
    dsn.add(sender, queue)
    [(_, dsn_id)] = store(spool, dsn, "odmrd bounce for %s/%s" % (message.domain, message.id), data)
    log.info("bounce: %s/%s: DSN (%s) to <%s> for %s queued as %s/%s", message.domain, message.id,
             action, sender, ",".join(results), queue, dsn_id)
    return dsn_id
