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
LOCAL_SERVER_UNAVAILABLE = (421, "4.3.0 Local mail server unavailable, try again later")
LOCAL_MAILBOX_UNAVAILABLE = (421, "4.3.0 Local mailbox unavailable, try again later")
SESSION_LIMIT = (421, "4.7.0 %s")
# why SESSION_LIMIT: the listener's max_sessions, or its max_sessions_per_address
TOO_MANY_SESSIONS = "Too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "Too many connections from your address"
BDAT_SYNTAX = (501, "5.5.4 Syntax: BDAT chunk-size [LAST]")
NEED_MAIL_BEFORE_BDAT = (503, "5.5.1 Need MAIL and RCPT before BDAT")
DATA_AFTER_BDAT = (503, "5.5.1 DATA after BDAT in one transaction; transaction dropped")
NULL_RECIPIENT = (501, "5.1.3 Null recipient not allowed")
BAD_RECIPIENT = (501, "5.1.3 Bad recipient address syntax")
NON_ASCII_ADDRESS = (553, "5.6.7 Non-ASCII address needs SMTPUTF8")
RELAYING_DENIED = (550, "5.7.1 Relaying denied")
NO_SUCH_USER = (550, "5.1.1 No such user here")
CLOSING = (221, "2.0.0 %s closing connection")
START_DATA = (354, "End data with <CR><LF>.<CR><LF>")
QUEUED = (250, "2.0.0 Ok: queued as %s")
DELIVERED = (250, "2.0.0 Ok: delivered as %s")
CHUNK_RECEIVED = (250, "2.0.0 %d octets received")
START_TLS = (220, "2.0.0 Ready to start TLS")

# greetings (220), with the session's hostname
INTAKE_GREETING = (220, "%s ESMTP odmrd ready")
ODMR_GREETING = (220, "%s ESMTP odmrd on-demand mail relay server ready")
FETCH_GREETING = (220, "%s ESMTP odmrd fetch ready")

# the session ends (421), with the session's hostname
TIMEOUT = (421, "4.4.2 %s Timeout, closing connection")
SHUTTING_DOWN = (421, "4.3.2 %s Service shutting down")
TOO_MANY_ERRORS = (421, "4.7.0 %s Too many errors, closing connection")
DATA_TOO_SLOW = (451, "4.4.2 %s DATA took too long, closing connection")

# commands the read loop refuses before any verb sees them
LINE_TOO_LONG = (500, "5.5.2 Line too long")
INVALID_UTF8 = (500, "5.5.2 Syntax error: invalid UTF-8")
CONTROL_CHARACTERS_IN_ARGUMENT = (501, "5.5.4 Syntax error: control characters in the argument")
CONTROL_CHARACTERS = (500, "5.5.2 Syntax error: control characters")
UNRECOGNIZED = (500, "5.5.1 Command unrecognized")
NOT_IMPLEMENTED = (502, "5.5.1 Command not implemented")
NOT_IMPLEMENTED_ON_ODMR_PORT = (502, "5.5.1 Command not implemented on the ODMR port")

# EHLO/HELO (RFC 5321 §4.1.4): a domain or an address literal; %s is the verb
BAD_HELO_NAME = (501, "5.5.4 Syntax: %s domain or address literal")
USE_EHLO = (502, "5.5.1 Use EHLO: ODMR needs ESMTP")

# STARTTLS (RFC 3207)
TLS_NOT_AVAILABLE = (502, "5.5.1 STARTTLS not available")
TLS_ALREADY_ACTIVE = (503, "5.5.1 TLS already active")
STARTTLS_SYNTAX = (501, "5.5.4 Syntax: STARTTLS")
TLS_REQUIRED = (530, "5.7.0 Must issue a STARTTLS command first")

# the intake port's other verbs
VRFY_INTAKE = (252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
VRFY_FETCH = (252, "2.5.0 Send some mail, I'll try my best")
EXPN_NOT_IMPLEMENTED = (502, "5.5.1 EXPN not implemented")
HELP = (214, "2.0.0 See RFC 5321")
BDAT_NOT_IMPLEMENTED = (502, "5.5.1 BDAT not implemented")
ETRN_NOT_IMPLEMENTED = (502, "5.5.1 ETRN not implemented; use ATRN on the ODMR port")
DATA_SYNTAX = (501, "5.5.4 Syntax: DATA")

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
RCPT_PARAMETERS_SYNTAX = (501, "5.5.4 Syntax error in RCPT parameters")
RET_SYNTAX = (501, "5.5.4 Syntax: RET=FULL or RET=HDRS")
ENVID_SYNTAX = (501, "5.5.4 Syntax: ENVID=xtext of at most 100 characters")
NOTIFY_SYNTAX = (501, "5.5.4 Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY")
ORCPT_SYNTAX = (501, "5.5.4 Syntax: ORCPT=addr-type;xtext")

# senders and recipients (odmr.submission judges them for intake and enqueue alike)
NON_ASCII_SENDER = (553, "5.6.7 Non-ASCII sender needs SMTPUTF8")
NON_ASCII_RECIPIENT = (553, "5.6.7 Non-ASCII recipient needs SMTPUTF8")
SENDER_NEEDS_DOMAIN = (553, "5.1.7 Sender address needs a domain")
SENDER_TOO_LONG = (553, "5.1.7 Sender address too long")
SENDER_BAD_DOMAIN = (553, "5.1.7 Sender domain refused: %s")
RECIPIENT_TOO_LONG = (501, "5.1.3 Recipient address too long")
ROUTING_REFUSED = (550, "5.7.1 Routing refused: %s")
MAILBOX_FULL = (452, "4.2.2 Mailbox full for %s, try again later")

# the message itself
TOO_BIG = (552, "5.3.4 Message size exceeds fixed limit of %d bytes")
NO_STORAGE = (452, "4.3.1 Insufficient system storage")
LOCAL_ERROR = (451, "4.3.0 Local error in processing, try again later")
TOO_MANY_RECIPIENTS = (452, "4.5.3 Too many recipients")
# a mail loop (RFC 5321 §6.3, odmr.hops): the Received: fields and their limit; our own count
TOO_MANY_HOPS = (554, "5.4.6 Too many hops: %d Received: header fields (limit %d); a mail loop?")
MAIL_LOOP = (554, "5.4.6 Mail loop: the message has passed through this host %d times")

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
ATRN_SYNTAX = (501, "5.5.4 Syntax: ATRN [domain *(\",\" domain)]")
AUTH_SYNTAX = (501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
ALREADY_AUTHENTICATED = (503, "5.5.1 Already authenticated")
AUTH_CANCELLED = (501, "5.7.0 Authentication cancelled")
AUTH_MALFORMED = (501, "5.5.2 Malformed authentication exchange")
AUTH_OK = (235, "2.7.0 Authentication successful")
AUTH_FAILED = (535, "5.7.8 Authentication credentials invalid")
TOO_MANY_AUTH_FAILURES = (421, "4.7.0 %s Too many authentication failures")
AUTH_THROTTLED = (421, "4.7.0 %s Too many failed authentications from your address, "
                       "try again later")
EXTERNAL_NEEDS_CERTIFICATE = (504, "5.5.4 EXTERNAL needs a verified TLS client certificate")
UNRECOGNIZED_MECHANISM = (504, "5.5.4 Unrecognized authentication type")
MECHANISM_NEEDS_TLS = (538, "5.7.11 Encryption required for requested authentication mechanism")
