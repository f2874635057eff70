"""What one `odmrd fetch` run delivered, counted in messages and recipients.

The receiving side of the reversed connection (the local SMTP server behind
`--relay`, or fetch's own server for `--maildir`/`--mbox`) answers the
provider's commands; fed each reply together with the command it answers,
`Tally` follows the transactions and counts what the provider will do with
the mail: delivered, deferred (it stays at the provider), refused (the
provider returns it to the sender). It knows nothing of sockets.
"""
from __future__ import annotations

from typing import List

from odmr.names import plural

# What a reply answers. DATA is the DATA command (354 expected) or a BDAT chunk
# that is not the last; END is the end of the message data (or BDAT ... LAST).
GREETING, MAIL, RCPT, DATA, END = "GREETING", "MAIL", "RCPT", "DATA", "END"
MAX_TEXT = 200


class Tally:
    """Counts per run; `reply()` is called once per final reply, in order."""

    def __init__(self) -> None:
        self.delivered = 0          # messages: 2xx after the data
        self.deferred = 0           # messages: 4xx to MAIL, DATA or the end of data
        self.refused = 0            # messages: 5xx to MAIL, DATA or the end of data
        self.rcpt_deferred = 0      # 4xx to RCPT
        self.rcpt_refused = 0       # 5xx to RCPT
        self.first_problem = ""     # the first 4xx/5xx in a transaction, for -v
        self._greeting = ""         # why the session could carry no mail at all
        self._helo = ""
        self._closing = ""
        self._open = False          # MAIL accepted, transaction not over yet
        self._accepted = 0          # recipients accepted in this transaction

    def reply(self, command: str, code: int, line: str = "") -> None:
        """`line` is the reply's last line as received (for the log only)."""
        if code == 421 and not self._closing:
            self._closing = "it closed the session: %s" % line[:MAX_TEXT]
        if command == MAIL:
            self._open, self._accepted = code < 400, 0
            if code >= 400:
                self._message_failed(code, line)
        elif command == RCPT:
            if not self._open:
                return              # MAIL failed (and was counted), or no MAIL at all
            if code < 400:
                self._accepted += 1
            else:
                self._note(line)
                if code < 500:
                    self.rcpt_deferred += 1
                else:
                    self.rcpt_refused += 1
        elif command in (DATA, END):
            if not self._open or (command == DATA and code < 400):
                return              # 354, or 250 to a BDAT chunk
            self._open = False
            if code < 400:
                self.delivered += 1
            elif self._accepted:    # without recipients, DATA fails and that says nothing new
                self._message_failed(code, line)
        elif command == GREETING:
            if code >= 400:
                self._greeting = "it greeted with %s" % line[:MAX_TEXT]
        elif command in ("EHLO", "HELO"):
            self._open = False
            self._helo = "" if code < 400 else "it refused %s: %s" % (command, line[:MAX_TEXT])
        elif command == "RSET":
            self._open = False

    def _message_failed(self, code: int, line: str) -> None:
        self._note(line)
        if code < 500:
            self.deferred += 1
        else:
            self.refused += 1

    def _note(self, line: str) -> None:
        if not self.first_problem:
            self.first_problem = line[:MAX_TEXT]

    @property
    def session_problem(self) -> str:
        """Why the session carried no (more) mail, if the receiving side said so."""
        return self._greeting or self._helo or self._closing

    def kept_at_provider(self) -> bool:
        """Did the receiving side leave mail at the provider (exit 75)?"""
        return bool(self.deferred or self.rcpt_deferred or self.session_problem)

    def summary(self, where: str) -> str:
        """One line: '3 messages delivered to 127.0.0.1:25 (1 recipient deferred: stays at the provider)'."""
        head = "%s delivered to %s" % (plural(self.delivered, "message") if self.delivered
                                       else "no messages", where)
        notes: List[str] = []
        if self.session_problem:
            notes.append("%s: the mail stays at the provider" % self.session_problem)
        deferred = _counts(self.deferred, self.rcpt_deferred)
        if deferred:
            one = self.deferred + self.rcpt_deferred == 1
            notes.append("%s deferred: %s at the provider" % (deferred, "stays" if one else "stay"))
        refused = _counts(self.refused, self.rcpt_refused)
        if refused:
            one = self.refused + self.rcpt_refused == 1
            notes.append("%s refused: returned to %s" % (refused, "its sender" if one else "the senders"))
        return head + (" (%s)" % "; ".join(notes) if notes else "")


def _counts(messages: int, recipients: int) -> str:
    parts = [plural(messages, "message")] if messages else []
    if recipients:
        parts.append(plural(recipients, "recipient"))
    return " and ".join(parts)
