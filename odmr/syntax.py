"""What a client puts in its greeting and envelope, judged before odmrd repeats it.

Two things odmrd passes on downstream are dangerous when taken as sent:

- A local part that names another destination (`user%host@`, `host!user@`,
  `"user@host"@`, `a@b@`, a comment, a source route). The customer's MTA
  receives odmrd's deliveries from 127.0.0.1 (fetchmail, `fetch --relay`)
  and Postfix, sendmail and Exim follow such routes by default, so the pair
  would relay mail anywhere.
- The EHLO/HELO name and the recipient, which end up in a `Received:` header;
  only a domain or an address literal (RFC 5321 §4.1.4) and a plain address
  may fill their slots, never text that reads as further trace fields.
  The `Received:` headers themselves are made here too, for the intake port,
  `odmrd enqueue` and the customer's local server alike.
"""
from __future__ import annotations

import email.utils
import functools
import ipaddress
import os
import re
import string
import time
import unicodedata
from typing import Iterable, List, Optional, Tuple

_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_DOMAIN = 255                                      # RFC 5321 §4.5.3.1.2

# RFC 5322 atext without '!' and '%', which MTAs read as routes, plus the dots of a dot-string
_PLAIN_LOCAL = frozenset(string.ascii_letters + string.digits + "#$&'*+-/=?^_`{|}~.")
# what a quoted local part may not hold once unquoted: routes, comments, lists, groups, quoting
_QUOTED_SPECIALS = frozenset('@%!()<>[]:;,\\"')


def helo_name_ok(text: str) -> bool:
    """Whether an EHLO/HELO argument is a domain (LDH labels, one trailing dot
    allowed) or an IPv4 / IPv6 address literal; nothing else, no U-labels."""
    if not text or len(text) > MAX_DOMAIN or not text.isascii():
        return False
    if text.startswith("["):
        return _address_literal_ok(text)
    name = text[:-1] if text.endswith(".") else text
    return bool(name) and all(_LDH_LABEL.fullmatch(label) for label in name.split("."))


def _address_literal_ok(text: str) -> bool:
    if not text.endswith("]"):
        return False
    inner = text[1:-1]
    kind = ipaddress.IPv4Address
    if inner[:5].lower() == "ipv6:":
        inner, kind = inner[5:], ipaddress.IPv6Address
    # only hexadecimal digits, colons and dots: no zone index (%eth0), no spaces
    if not inner or any(c not in string.hexdigits + ":." for c in inner):
        return False
    try:
        kind(inner)
    except ValueError:
        return False
    return True


def split_source_route(path: str) -> Tuple[str, str]:
    """`@a,@b:user@d` -> ('@a,@b', 'user@d'); a path without a route -> ('', path).
    ValueError when a route is not ended by ':'."""
    if not path.startswith("@"):
        return "", path
    in_literal = False
    for index, char in enumerate(path):
        if char == "[":
            in_literal = True
        elif char == "]":
            in_literal = False
        elif char == ":" and not in_literal:
            return path[:index], path[index + 1:]
    raise ValueError("source route without ':'")


def _unquote(local: str) -> Optional[str]:
    """The content of a local part that is exactly one quoted string, else None."""
    out = []
    index = 1
    while index < len(local):
        char = local[index]
        if char == "\\":
            if index + 1 >= len(local):
                return None
            out.append(local[index + 1])
            index += 2
            continue
        if char == '"':
            return "".join(out) if index == len(local) - 1 else None
        out.append(char)
        index += 1
    return None


def _forbidden(text: str, allowed) -> Optional[str]:
    """The first character of `text` outside `allowed` (ASCII) or, for other
    characters, one whose compatibility form is such a character (e.g. '％')."""
    for char in text:
        if char.isascii():
            if not allowed(char):
                return char
        else:
            for folded in unicodedata.normalize("NFKC", char):
                if folded.isascii() and not allowed(folded):
                    return char
    return None


def route_in_address(address: str) -> Optional[str]:
    """Why `local@domain` could be routed onward by the MTA it is handed to, or None.

    The local part (before the last '@') must be a dot-string of atext other
    than '%' and '!', or one quoted string whose content holds none of
    '@%!()<>[]:;,\\"'; the domain may hold no comment."""
    local, _, domain = address.rpartition("@")
    if "(" in domain or ")" in domain:
        return "a comment in the address"
    if local.startswith('"'):
        content = _unquote(local)
        if content is None:
            return "a malformed quoted local part"
        if not content:
            return "an empty quoted local part"
        char = _forbidden(content, lambda c: c not in _QUOTED_SPECIALS)
        if char is not None:
            return "%s inside a quoted local part" % _describe(char)
        return None
    # a backslash outside quotes routes nothing; it is left to the syntax check (501)
    if local.isascii() and _PLAIN_LOCAL.issuperset(local):      # the common case, in C
        return None
    char = _forbidden(local, lambda c: c in _PLAIN_LOCAL or c == "\\")
    if char is not None:
        return "%s in the local part" % _describe(char)
    return None


def _describe(char: str) -> str:
    names = {"@": "an '@'", "%": "a '%' (percent hack)", "!": "a '!' (bang path)",
             "(": "a comment", ")": "a comment", '"': "a quote", "\\": "a backslash"}
    return names.get(char, "the character %s" % ascii(char))


_FOR_LOCAL = _PLAIN_LOCAL | frozenset("%!")         # harmless in a `for` slot
_FOR_DOMAIN = frozenset(string.ascii_letters + string.digits + "-.")


def plain_address(address: str) -> bool:
    """An address that can stand in a `Received: ... for <...>` slot as it is:
    a dot-string local part and a domain of letters, digits, hyphens and dots
    (non-ASCII letters included), so no quote, comment, ';' or space."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    if address.isascii():                                       # the common case, in C
        return _FOR_LOCAL.issuperset(local) and _FOR_DOMAIN.issuperset(domain)
    for char in local:
        if char.isascii() and char not in _PLAIN_LOCAL and char not in "%!":   # harmless here
            return False
        if not char.isascii() and (not char.isprintable() or char.isspace()):
            return False
    return all(char.isalnum() or char in "-." for char in domain)


def for_clause(recipients: Iterable[str]) -> str:
    """The folded `for <address>` part of a Received: header: only for a single
    recipient, and only one whose address cannot read as more trace fields."""
    recipients = list(recipients)
    if len(recipients) == 1 and plain_address(recipients[0]):
        return "\r\n\tfor <%s>" % recipients[0]
    return ""


def tcp_info(peer_ip: str) -> str:
    """The client's address as a RFC 5321 address literal, or '' if it is not an address."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return ""
    mapped = getattr(ip, "ipv4_mapped", None)      # an IPv4 client on a dual-stack socket
    if mapped is not None:
        return "[%s]" % mapped
    return "[IPv6:%s]" % ip.compressed if ip.version == 6 else "[%s]" % ip


def received_protocol(esmtp: bool, smtputf8: bool, tls: bool) -> str:
    """The `with` word of a Received: header, from IANA's Mail Transmission Types
    (RFC 3848, RFC 6531): SMTP, ESMTP or UTF8SMTP, with S under TLS. There is no
    "SMTPS": a HELO session under TLS is plain SMTP there."""
    if not esmtp:
        return "SMTP"
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "")


def received_header(helo: str, peer_ip: str, hostname: str, protocol: str,
                    msg_id: str, recipients: List[str]) -> bytes:
    """A RFC 5321 §4.4 trace header, folded. Each slot holds only what fits it: the
    EHLO name if it is a domain or an address literal (the sessions refuse others),
    the peer as an address literal, `for` only for one plain address."""
    text = "Received: from %s\r\n\tby %s (odmrd) with %s id %s%s;\r\n\t%s\r\n" % (
        _from_part(helo, peer_ip), hostname, protocol, msg_id, for_clause(recipients), _date_now())
    return text.encode("utf-8", "replace")


@functools.lru_cache(maxsize=256)
def _from_part(helo: str, peer_ip: str) -> str:
    """The `from` slot; the same for every message of a session, so worked out once."""
    info = tcp_info(peer_ip)
    return (helo if helo_name_ok(helo) else "unknown") + (" (%s)" % info if info else "")


_dated = (-1.0, "")     # (second, its RFC 5322 date): one tuple, read whole by every thread


def _date_now() -> str:
    """The date of a trace header, formatted once per second (a busy intake stamps a
    few thousand messages in each)."""
    global _dated
    second, text = _dated
    now = int(time.time())
    if now != second:
        text = email.utils.formatdate(now, localtime=True)
        _dated = (now, text)
    return text


def local_received_header(hostname: str, msg_id: str, recipients: List[str]) -> bytes:
    """The trace header of a message handed over on this host (`odmrd enqueue`): no
    client to name, so the submitting user's uid instead."""
    text = "Received: by %s (odmrd enqueue, uid %d) id %s" % (hostname, os.getuid(), msg_id)
    text += for_clause(recipients)
    return (text + ";\r\n\t%s\r\n" % _date_now()).encode("utf-8")


def printable(text: str, limit: int = 300) -> str:
    """Client input made fit for one log line or one error line."""
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256
                   else "\\u%04x" % ord(c) for c in text[:limit])
