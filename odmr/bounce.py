"""Delivery status notifications (RFC 3464) and where they go.

A DSN for a sender in a hosted domain is spooled for that domain like any
other mail; one for anybody else waits in the OUTBOUND queue for
`bounce_relay`. A null sender (<>) never gets one.
"""
from __future__ import annotations

import email.utils
import logging
import re
import time
from email.message import EmailMessage, Message as EmailPart
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from typing import Dict, Optional

from odmr.names import normalize_domain, split_address
from odmr.spool import OUTBOUND, Envelope, Message, Recipient, Spool

log = logging.getLogger("odmrd.bounce")

_STATUS = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


def status_of(reply: str, default: str) -> str:
    m = _STATUS.match(reply or "")
    return m.group(1) if m else default


def _original_headers(message: Message, limit: int = 65536) -> bytes:
    with message.open_data() as fh:
        head = fh.read(limit)
    end = head.find(b"\r\n\r\n")
    return head[: end + 2] if end >= 0 else head


def build_dsn(hostname: str, message: Message, results: Dict[str, str], action: str = "failed") -> bytes:
    """A multipart/report DSN; `results` maps each recipient to the customer's reply (or a reason)."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "Mail Delivery System <MAILER-DAEMON@%s>" % hostname
    report["To"] = "<%s>" % message.envelope.sender
    report["Subject"] = ("Undelivered Mail Returned to Sender" if action == "failed"
                         else "Delayed Mail (still being retried)")
    report["Date"] = email.utils.formatdate(localtime=True)
    report["Message-ID"] = email.utils.make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"

    if action == "failed":
        intro = ("This is the mail system at %s.\n\nYour message could not be delivered to "
                 "the following recipients. This is a permanent error.\n\n" % hostname)
    else:
        intro = ("This is the mail system at %s.\n\nYour message has not been delivered yet to "
                 "the following recipients. It is still queued; no action is needed.\n\n" % hostname)
    intro += "".join("<%s>: %s\n" % (rcpt, reply) for rcpt, reply in results.items())
    report.attach(MIMEText(intro, "plain", "utf-8"))

    fields = ["Reporting-MTA: dns; %s" % hostname,
              "Arrival-Date: %s" % email.utils.formatdate(message.envelope.arrival, localtime=True),
              ""]
    default = "5.0.0" if action == "failed" else "4.0.0"
    for rcpt, reply in results.items():
        fields += ["Final-Recipient: rfc822; %s" % rcpt,
                   "Action: %s" % action,
                   "Status: %s" % status_of(reply, default),
                   "Diagnostic-Code: smtp; %s" % " ".join(reply.split())[:900],
                   ""]
    status = MIMEBase("message", "delivery-status")
    status.set_payload("\r\n".join(fields))
    report.attach(status)

    headers = MIMEBase("text", "rfc822-headers")
    headers.set_payload(_original_headers(message).decode("utf-8", "replace"))
    report.attach(headers)
    return report.as_bytes(policy=SMTP)


def send_dsn(spool: Spool, hosted: frozenset, hostname: str, message: Message,
             results: Dict[str, str], action: str = "failed") -> Optional[str]:
    """Spool a DSN for `message`; returns its id, or None when the sender is <>."""
    sender = message.envelope.sender
    if not sender:
        log.info("bounce: %s/%s: null sender, no DSN for %s", message.domain, message.id,
                 ",".join(results))
        return None
    data = build_dsn(hostname, message, results, action)
    try:
        domain = normalize_domain(split_address(sender)[1])
    except ValueError:
        domain = ""
    queue = domain if domain in hosted else OUTBOUND
    envelope = Envelope(sender="", recipients=[Recipient(sender)], arrival=time.time(),
                        client="odmrd bounce for %s/%s" % (message.domain, message.id))
    dsn_id = spool.store(queue, envelope, data)
    log.info("bounce: %s/%s: DSN (%s) to <%s> queued as %s/%s", message.domain, message.id,
             action, sender, queue, dsn_id)
    return dsn_id
