"""One whole ODMR conversation as RFC 2645 draws it, byte by byte over real sockets:
EHLO, AUTH CRAM-MD5, ATRN, the turnaround, one message (dot-stuffed) and QUIT."""
import base64
import hmac

from helpers import ATRN_OK, PASSWORD, send_mail


def test_the_rfc2645_conversation_delivers_and_empties_the_spool(provider, customer_factory):
    send_mail(provider.smtp_port, "sender@remote.test", ["user@example.org"],
              b"Subject: seed\r\n\r\nhello\r\n.leading dot\r\n")
    c = customer_factory()
    code, greeting = c.reply()
    assert code == 220 and greeting[0].startswith("odmr.test")
    code, lines = c.cmd("EHLO example.org")
    assert code == 250
    assert any(l.startswith("AUTH") and "CRAM-MD5" in l.split() for l in lines)
    assert "ATRN" in lines
    code, lines = c.cmd("AUTH CRAM-MD5")
    assert code == 334
    digest = hmac.new(PASSWORD.encode(), base64.b64decode(lines[0]), "md5").hexdigest()
    code, _ = c.cmd(base64.b64encode(b"alice " + digest.encode()).decode())
    assert code == 235
    c.send("ATRN example.org, example.com")
    assert c.line() == ATRN_OK
    c.send("220 example.org ready for mail")
    assert c.line() == b"EHLO odmr.test\r\n"
    c.send("250 example.org")
    assert c.line() == b"MAIL FROM:<sender@remote.test>\r\n"
    c.send("250 ok")
    assert c.line() == b"RCPT TO:<user@example.org>\r\n"
    c.send("250 ok")
    assert c.line() == b"DATA\r\n"
    c.send("354 go ahead")
    body = []
    while True:
        line = c.line()
        if line == b".\r\n":
            break
        body.append(line)
    text = b"".join(body)
    assert text.startswith(b"Received: ")
    assert text.endswith(b"Subject: seed\r\n\r\nhello\r\n..leading dot\r\n")
    c.send("250 stored")
    assert c.line() == b"QUIT\r\n"
    c.send("221 bye")
    assert c.line() == b""
    assert provider.spooled("example.org") == []
