"""Domain names and mail addresses, checked before they reach a path or a lock.

Every domain that names a spool directory, an account's domain or a policy
passes through `normalize_domain`, so two spellings of one domain meet (a
U-label and its A-label, upper and lower case) and the directory name is
always a lower-case A-label string built from letters, digits, hyphens and
dots — never raw client input.
"""
from __future__ import annotations

import functools
import importlib
import re
import unicodedata
from typing import Tuple

import idna

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# idna loads these at first use; after the privilege drop a library out of the service
# account's reach (a Python under /root) could not be read: load them now
for _lazy in ("encodings.punycode", "idna.uts46data"):
    importlib.import_module(_lazy)


def normalize_domain(text: str) -> str:
    """Return the lower-case A-label form of a domain (IDNA 2008, UTS #46
    non-transitional), or raise ValueError.

    A U-label and its A-label give the same string; a name IDNA 2008 does not
    allow is refused, never mapped onto another (Python's own "idna" codec is
    IDNA 2003: it would turn straße.de into strasse.de, another domain)."""
    if not isinstance(text, str) or not text:
        raise ValueError("empty domain")
    if len(text) > 253 * 4:
        raise ValueError("domain too long")
    return _normalized(text)


@functools.lru_cache(maxsize=4096)
def _normalized(text: str) -> str:
    name = text.lower() if text.isascii() else ""
    if name and "xn--" not in name and _plain_labels(name):
        return name                     # the common case, and what idna would answer
    _refuse_invisible(text)
    try:
        name = idna.encode(text, uts46=True, std3_rules=True).decode("ascii")
        # an A-label that does not decode to the U-label it claims to be is not one
        canonical = idna.encode(idna.decode(name)).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise ValueError("not a valid IDNA 2008 domain name: %s" % _clip(str(exc))) from None
    if name.endswith("."):
        raise ValueError("a mail domain has no trailing dot")
    if canonical != name:
        raise ValueError("not a valid IDNA 2008 domain name: an A-label that is not "
                         "the encoding of its U-label")
    if not _plain_labels(name, a_labels=True):
        raise ValueError("not a valid IDNA 2008 domain name")
    return name


def _plain_labels(name: str, a_labels: bool = False) -> bool:
    """Letters, digits and inner hyphens, at most 253 octets; "--" in the third and
    fourth place only in an A-label (xn--), and only when `a_labels` allows them."""
    if len(name) > 253:
        return False
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return False
        if label[2:4] == "--" and not (a_labels and label.startswith("xn--")):
            return False
    return True


def _refuse_invisible(text: str) -> None:
    """UTS #46 silently drops some characters (soft hyphen, zero-width space, variation
    selectors): a name that holds one is not the name it would become, so it is refused."""
    for char in text:
        if char.isascii():
            continue
        try:
            dropped = idna.uts46_remap(char, std3_rules=True) == ""
        except (idna.IDNAError, UnicodeError, ValueError):
            continue                    # disallowed: idna.encode says so with its reason
        if dropped:
            raise ValueError("invisible character U+%04X in a domain name" % ord(char))


def _clip(reason: str) -> str:
    return reason if len(reason) <= 160 else reason[:157] + "..."


def split_address(address: str) -> Tuple[str, str]:
    """Split `local@domain` at the last '@'; the domain is not normalised."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("address needs local@domain")
    return local, domain


def address_is_safe(address: str) -> bool:
    """No angle brackets, controls or line separators: such an address could break
    an envelope line in the spool or a command line sent to a customer."""
    if address.isascii() and address.isprintable():     # the common case, in C
        return "<" not in address and ">" not in address and "\\" not in address \
            and len(address) <= 512
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
