"""Files stay private: a users file others can read stops the start (and
check-config) with one line saying how to fix it; the spool's directories and
messages are created owner-only."""
from __future__ import annotations

import os

import pytest

from helpers import Provider, run_cli, send_mail


@pytest.mark.slow
def test_users_file_must_be_private(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    os.chmod(p.users, 0o644)
    result = run_cli("-c", p.config, "serve", "-f", timeout=30)
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "too open" in err and "chmod 600" in err and "Traceback" not in err
    check = run_cli("-c", p.config, "check-config")
    assert check.returncode == 78 and "too open" in check.stderr.decode()


def test_spool_modes(provider):
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.org"], b"Subject: x\r\n\r\ny\r\n")
    directory = os.path.join(provider.spool_dir, "example.org")
    assert os.stat(directory).st_mode & 0o777 == 0o700
    for name in provider.spooled("example.org"):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600
