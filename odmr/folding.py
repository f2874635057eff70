"""Lines longer than SMTP allows, broken before they go to a customer.

RFC 5321 §4.5.3.1.6: a text line is at most 998 octets plus CRLF. The intake
accepts and stores longer ones (SPEC §8: refusing mail for a long line helps
nobody), so delivery breaks them as Postfix's `smtp_line_length_limit` does:
a CRLF and a space after every 998 octets, which a MIME reader takes for
folding in a header and which changes the least in a body.
"""
from __future__ import annotations

MAX_LINE = 998


def has_long_lines(text: bytes) -> bool:
    """(A split and a length per line: a regular expression would look at every
    position and cost a millisecond for a 10 KB message.)"""
    if len(text) <= MAX_LINE:
        return False
    lines = text.split(b"\n")
    if max(map(len, lines)) <= MAX_LINE:          # all in C: the usual answer, at once
        return False
    return any(len(line) > MAX_LINE and len(line.rstrip(b"\r")) > MAX_LINE for line in lines)


class LineBreaker:
    """Breaks long lines in a text fed in pieces of any size."""

    def __init__(self) -> None:
        self._column = 0          # octets on the current line so far (a CR not counted)
        self._held_cr = False     # a CR ended the last piece: a CRLF may be cut in two

    def feed(self, piece: bytes) -> bytes:
        if self._held_cr:
            piece = b"\r" + piece
            self._held_cr = False
        if piece.endswith(b"\r"):
            piece, self._held_cr = piece[:-1], True
        if self._fits(piece):
            return piece
        out = []
        for line in piece.splitlines(keepends=True):
            out.append(self._line(line))
        return b"".join(out)

    def _fits(self, piece: bytes) -> bool:
        """No line too long (the usual case): the column moves on, the piece stays as it is."""
        lines = piece.split(b"\n")
        if self._column + len(lines[0].rstrip(b"\r")) > MAX_LINE:
            return False
        if len(lines) > 1:
            if len(lines[-1]) > MAX_LINE or (max(map(len, lines)) > MAX_LINE and any(
                    len(line) > MAX_LINE and len(line.rstrip(b"\r")) > MAX_LINE for line in lines[1:-1])):
                return False
            self._column = len(lines[-1])
        else:
            self._column += len(piece)
        return True

    def finish(self) -> bytes:
        """What is held back at the end of the text."""
        if self._held_cr:
            self._held_cr = False
            return self._line(b"\r")
        return b""

    def _line(self, line: bytes) -> bytes:
        """One line, or the start or rest of one (`splitlines` ends a piece at CR, LF, CRLF)."""
        stripped = line.rstrip(b"\r\n")
        ending = line[len(stripped):]
        out = []
        start = 0
        while len(stripped) - start > MAX_LINE - self._column:
            take = MAX_LINE - self._column
            out.append(stripped[start:start + take] + b"\r\n ")
            start += take
            self._column = 1
        out.append(stripped[start:] + ending)
        self._column = 0 if ending else self._column + len(stripped) - start
        return b"".join(out)


def break_long_lines(text: bytes) -> bytes:
    """A whole text with its long lines broken (itself when it has none)."""
    if not has_long_lines(text):
        return text
    breaker = LineBreaker()
    return breaker.feed(text) + breaker.finish()
