"""Domain names and mail addresses, checked before they reach a path or a lock.

Every domain that names a spool directory passes through `normalize_domain`,
so the directory name is always a lower-case A-label string built from
letters, digits, hyphens and dots — never raw client input.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Tuple

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def normalize_domain(text: str) -> str:
    """Return the lower-case A-label form of a domain, or raise ValueError."""
    if not isinstance(text, str) or not text:
        raise ValueError("empty domain")
    if len(text) > 253 * 4:
        raise ValueError("domain too long")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except (UnicodeError, ValueError):
            raise ValueError("invalid internationalised domain") from None
    name = text.lower()
    if len(name) > 253:
        raise ValueError("domain too long")
    labels = name.split(".")
    if len(labels) < 1:
        raise ValueError("empty domain")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValueError("invalid domain label %r" % label[:70])
    return name


def is_valid_domain(text: str) -> bool:
    try:
        normalize_domain(text)
    except ValueError:
        return False
    return True


def split_address(address: str) -> Tuple[str, str]:
    """Split `local@domain` at the last '@'; the domain is not normalised."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("address needs local@domain")
    return local, domain


def address_is_safe(address: str) -> bool:
    """No angle brackets, controls or line separators: such an address could break
    an envelope line in the spool or a command line sent to a customer."""
    for char in address:
        if char in "<>\\" or ord(char) < 32 or 0x7F <= ord(char) <= 0x9F:
            return False
        if char in "\u2028\u2029\u0085\ufeff" or unicodedata.category(char) in ("Zl", "Zp", "Cc", "Cs"):
            return False
    return len(address) <= 512


def mailbox_key(address: str, domain: str) -> str:
    """One key per mailbox: the local part as given (it may be case-sensitive) and the
    normalised domain, so <u@a.test> and <u@A.TEST> are one recipient, not two."""
    return address.rpartition("@")[0] + "@" + domain


def plural(count: int, word: str) -> str:
    """`1 message`, `2 messages`: counts in logs and listings read as English."""
    return "%d %s%s" % (count, word, "" if count == 1 else "s")
