"""Replies the SMTP sessions share, named once so code and tests agree on them.

Each is (code, text); a text with `%s` takes the session's hostname or the
word it names. Tests import these instead of repeating the numbers.
"""
from __future__ import annotations

from typing import Tuple

Reply = Tuple[int, str]

OK = (250, "2.0.0 Ok")
MAIL_OK = (250, "2.1.0 Ok")
RCPT_OK = (250, "2.1.5 Ok")
CLOSING = (221, "2.0.0 %s closing connection")
START_DATA = (354, "End data with <CR><LF>.<CR><LF>")

# sequencing (RFC 5321 §4.1.4): 503, counted as a bad command
NEED_EHLO = (503, "5.5.1 Send EHLO first")
NESTED_MAIL = (503, "5.5.1 Nested MAIL command")
NEED_MAIL = (503, "5.5.1 Need MAIL command")
NEED_MAIL_BEFORE_RCPT = (503, "5.5.1 Need MAIL before RCPT")
NO_VALID_RECIPIENTS = (554, "5.5.1 No valid recipients")

# syntax: 501 for a malformed command or parameter value, 555 for a parameter
# not recognised or not implemented (RFC 5321 §4.1.1.11, §4.2.3)
MAIL_SYNTAX = (501, "5.5.4 Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = (501, "5.5.4 Syntax: RCPT TO:<address>")
BAD_MAIL_PARAMETERS = (501, "5.5.4 Bad MAIL parameters")
SIZE_SYNTAX = (501, "5.5.4 Syntax: SIZE=<number of octets>")
UNSUPPORTED_MAIL_PARAMETER = (555, "5.5.4 Unsupported MAIL parameter %s")
UNSUPPORTED_RCPT_PARAMETERS = (555, "5.5.4 Unsupported RCPT parameters")

# the message itself
TOO_BIG = (552, "5.3.4 Message size exceeds fixed limit of %d bytes")
NO_STORAGE = (452, "4.3.1 Insufficient system storage")
TOO_MANY_RECIPIENTS = (452, "4.5.3 Too many recipients")

# the ODMR port (RFC 2645 section 4; SPEC §4 gives their order). RFC 2645's texts, with
# the enhanced status code every reply carries once EHLO advertised ENHANCEDSTATUSCODES
# (RFC 2034 §3; AUTH's replies need them, RFC 4954 §6)
ATRN_OK = (250, "2.0.0 OK now reversing the connection")
ATRN_REFUSED = (450, "4.7.0 ATRN request refused")
ATRN_BUSY = (451, "4.3.0 Unable to process ATRN request now")
NO_MAIL = (453, "4.2.0 You have no mail")
SPOOL_UNCHANGEABLE = (451, "4.3.0 Unable to process ATRN request now")   # spool read-only, EIO...
AUTH_REQUIRED = (530, "5.7.0 Authentication required")
AUTH_LINE_TOO_LONG = (500, "5.5.6 Authentication exchange line is too long")
