"""Test certificates made with the real openssl binary: a CA, a server and a client cert."""
from __future__ import annotations

import os
import subprocess


def _run(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: str) -> dict:
    """Write ca.pem, server.pem/server.key (CN odmr.test, SAN 127.0.0.1) and client.pem/client.key."""
    os.makedirs(directory, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "30", "-subj", "/CN=odmrd test CA", cwd=directory)
    with open(os.path.join(directory, "server.ext"), "w") as fh:
        fh.write("subjectAltName=DNS:odmr.test,DNS:localhost,IP:127.0.0.1\n")
    for name, cn, ext in (("server", "odmr.test", "server.ext"), ("client", "alice", None),
                          ("stranger", "mallory", None)):
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".csr",
             "-subj", "/CN=%s" % cn, cwd=directory)
        args = ["x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "30"]
        if ext:
            args += ["-extfile", ext]
        _run(*args, cwd=directory)
    # a self-signed client certificate that the CA did not issue
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "selfsigned.key",
         "-out", "selfsigned.pem", "-days", "30", "-subj", "/CN=alice", cwd=directory)
    return {name: os.path.join(directory, name) for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key",
        "stranger.pem", "stranger.key", "selfsigned.pem", "selfsigned.key")}
