"""`odmrd fetch`: the customer side of ODMR (SPEC section 6).

This module owns the command line and the `[fetch]` config section, the
choice between relaying and local delivery, the exit code, and `--every`
polling. The protocol work lives elsewhere: `atrnclient` (up to ATRN),
`splice` (relay to a local SMTP server), `localdelivery` + `mailstore`
(be the SMTP server and write a Maildir/mbox).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from odmr import sasl
from odmr.atrnclient import (DEFAULT_PORT, EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_USAGE,
                             Endpoint, FetchError, NoMail, open_reversed)

EX_NOINPUT = 66
EX_CONFIG = 78
MAX_BACKOFF = 3600.0
RELAY_CONNECT_TIMEOUT = 60.0

log = logging.getLogger("odmrd.fetch")


class UsageError(Exception):
    def __init__(self, message: str, code: int = EX_USAGE):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


class _Stop(Exception):
    """SIGTERM/SIGINT while polling: stop quietly."""


@dataclass
class FetchOptions:
    endpoint: Endpoint
    relay: Optional[Tuple[str, int]]
    maildir: str
    mbox: str
    every: float
    verbose: bool
    max_size: int = 50 * 1024 * 1024    # as localdelivery.DEFAULT_MAX_SIZE; 0: no limit


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="odmrd fetch", description="Collect mail from an ODMR provider (RFC 2645).")
    p.add_argument("--server", metavar="HOST[:PORT]", help="the provider (port default %d)" % DEFAULT_PORT)
    p.add_argument("--user", metavar="NAME", help="account name")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the password (else $ODMR_PASSWORD)")
    p.add_argument("--domain", action="append", default=None, metavar="D",
                   help="domain to collect (repeatable; default: all of the account's)")
    p.add_argument("--tls", choices=("starttls", "implicit", "none"), default=None,
                   help="starttls (default; required, certificate verified), implicit, or none")
    p.add_argument("--ca-file", metavar="FILE", help="CA certificates to verify the provider with")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="do not verify the provider's certificate")
    p.add_argument("--mechanism", metavar="M", help="SASL mechanism (default: best offered)")
    p.add_argument("--relay", metavar="HOST:PORT", help="hand the mail to this local SMTP server")
    p.add_argument("--maildir", metavar="DIR", help="deliver into this Maildir")
    p.add_argument("--mbox", metavar="FILE", help="deliver into this mbox file")
    p.add_argument("--every", metavar="INTERVAL", help="poll forever at this interval (e.g. 15m)")
    p.add_argument("--max-size", metavar="SIZE",
                   help="with --maildir/--mbox: refuse messages over SIZE with 552 "
                        "(e.g. 10K, 50M; default 50M; 0: no limit)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the conversation on stderr")
    return p


# -- options ---------------------------------------------------------------------

def _fetch_section(config_path: Optional[str]) -> Tuple[dict, str, str]:
    """([fetch] values, directory for relative paths, host name) from the config file."""
    from odmr import config
    if not config_path:
        return {}, os.getcwd(), config.default_hostname()
    try:
        settings = config.load(config_path)
    except config.ConfigError as exc:
        raise UsageError("; ".join(exc.lines(config_path)), EX_CONFIG) from None
    return dict(settings.fetch), os.path.dirname(settings.path), settings.hostname


def _relative(base: str, path: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.join(base, path)


def _read_password(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            first = fh.readline()
    except OSError as exc:
        raise UsageError("cannot read password file %s: %s" % (path, exc.strerror or exc),
                         EX_NOINPUT) from None
    try:
        password = first.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("password file %s is not UTF-8" % path, EX_NOINPUT) from None
    if not password:
        raise UsageError("password file %s has an empty first line" % path, EX_NOINPUT)
    return password


def resolve_options(argv: List[str], config_path: Optional[str]) -> FetchOptions:
    """Flags over the config's [fetch] section; UsageError for anything unusable."""
    from odmr.config import parse_duration, parse_hostport
    from odmr.names import normalize_domain
    args = build_parser().parse_args(argv)
    section, base, hostname = _fetch_section(config_path)

    def pick(flag, key):
        return flag if flag not in (None, "", []) else section.get(key)

    server = pick(args.server, "server")
    user = pick(args.user, "user")
    if not server:
        raise UsageError("--server is required")
    if not user:
        raise UsageError("--user is required")
    try:
        host, port = parse_hostport(server, DEFAULT_PORT)
    except ValueError as exc:
        raise UsageError("--server: %s" % exc) from None

    if args.password_file:
        password = _read_password(args.password_file)
    elif os.environ.get("ODMR_PASSWORD"):
        password = os.environ["ODMR_PASSWORD"]
    elif section.get("password_file"):
        password = _read_password(_relative(base, section["password_file"]))
    else:
        raise UsageError("no password: give --password-file FILE or set ODMR_PASSWORD")
    if not password:
        raise UsageError("the password is empty")

    domains = []
    for item in pick(args.domain, "domains") or []:
        for name in str(item).split(","):
            try:
                domain = normalize_domain(name.strip())
            except ValueError as exc:
                raise UsageError("--domain %r: %s" % (name, exc)) from None
            if domain not in domains:
                domains.append(domain)

    mechanism = (pick(args.mechanism, "mechanism") or "").upper()
    if mechanism and mechanism not in sasl.CLIENT_MECHANISMS:
        raise UsageError("--mechanism: unknown mechanism %s (known: %s)"
                         % (mechanism, ", ".join(sorted(sasl.CLIENT_MECHANISMS))))

    ca_file = args.ca_file or _relative(base, section.get("ca_file") or "")
    if ca_file and not os.access(ca_file, os.R_OK):
        raise UsageError("cannot read CA file %s" % ca_file, EX_NOINPUT)
    if ca_file:
        # found out now, not after connecting: a directory or a file without certificates
        from odmr.atrnclient import FetchError, tls_context
        try:
            tls_context(ca_file, False)
        except FetchError as exc:
            raise UsageError(str(exc), EX_NOINPUT) from None

    given = [name for name in ("relay", "maildir", "mbox") if getattr(args, name)]
    if len(given) > 1:
        raise UsageError("give only one of --relay, --maildir, --mbox")
    if not given:
        given = [name for name in ("relay", "maildir", "mbox") if section.get(name)]
        if len(given) > 1:
            raise UsageError("[fetch] sets more than one of relay, maildir, mbox")
    if not given:
        raise UsageError("one of --relay HOST:PORT, --maildir DIR or --mbox FILE is required")
    target = given[0]
    value = getattr(args, target) or section.get(target)
    relay = None
    maildir = mbox = ""
    if target == "relay":
        try:
            relay = parse_hostport(value)
        except ValueError as exc:
            raise UsageError("--relay: %s" % exc) from None
    elif target == "maildir":
        maildir = value if args.maildir else _relative(base, value)
    else:
        mbox = value if args.mbox else _relative(base, value)
        if os.path.isdir(mbox):
            raise UsageError("--mbox %s is a directory (use --maildir?)" % mbox)

    max_size = _max_size(args.max_size, section, relay is not None)

    if args.every:
        try:
            every = parse_duration(args.every)
        except ValueError as exc:
            raise UsageError("--every: %s" % exc) from None
        if every <= 0:
            raise UsageError("--every must be more than 0")
    else:
        every = float(section.get("every") or 0)

    endpoint = Endpoint(host=host, port=port, user=user, password=password, domains=domains,
                        tls=args.tls or section.get("tls") or "starttls", ca_file=ca_file,
                        insecure=bool(args.insecure or section.get("insecure")),
                        mechanism=mechanism, helo=hostname)
    return FetchOptions(endpoint=endpoint, relay=relay, maildir=maildir, mbox=mbox,
                        every=every, verbose=args.verbose, max_size=max_size)


def _max_size(flag: Optional[str], section: dict, relaying: bool) -> int:
    """--max-size over [fetch] max_size; with --relay the local MTA sets its own limit."""
    from odmr.config import parse_size
    if flag is None:
        return int(section.get("max_size", FetchOptions.max_size))
    if relaying:
        raise UsageError("--max-size applies to --maildir and --mbox; with --relay the "
                         "local server enforces its own limit")
    try:
        return parse_size(flag)
    except ValueError as exc:
        raise UsageError("--max-size: %s" % exc) from None


# -- one run ---------------------------------------------------------------------

def _trace(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fetch_once(options: FetchOptions) -> int:
    """Connect, ATRN, receive; return the exit code of this run."""
    trace = _trace if options.verbose else None
    endpoint = options.endpoint
    try:
        turn = open_reversed(endpoint, trace)
    except NoMail as exc:
        log.info("no mail waiting (%s)", exc)
        return EX_OK
    except FetchError as exc:
        log.error("%s", exc)
        return exc.code
    try:
        if options.relay is not None:
            return _relay(turn, options.relay, trace)
        return _deliver_locally(turn, options, trace)
    finally:
        try:
            turn.sock.close()
        except OSError:
            pass


def _relay(turn, relay: Tuple[str, int], trace) -> int:
    from odmr.splice import splice
    try:
        local = socket.create_connection(relay, timeout=RELAY_CONNECT_TIMEOUT)
    except OSError as exc:
        log.error("cannot connect to the local SMTP server %s:%d: %s; the provider keeps the mail",
                  relay[0], relay[1], exc.strerror or exc)
        try:
            turn.sock.sendall(b"421 4.3.0 Local mail server unavailable, try again later\r\n")
        except OSError:
            pass
        return EX_TEMPFAIL
    try:
        result = splice(turn.sock, local, turn.leftover, progress=trace)
    finally:
        try:
            local.close()
        except OSError:
            pass
    if result.local_5xx:
        log.warning("the local server refused %d time(s) for good (5xx); the provider returns "
                    "that mail to its senders", result.local_5xx)
    if result.clean and result.local_4xx:
        log.error("the local server answered %d time(s) with 4xx; that mail stays at the "
                  "provider for the next run", result.local_4xx)
        return EX_TEMPFAIL
    if result.clean:
        log.info("relayed %d bytes from %s to %s:%d; session ended cleanly",
                 result.from_provider, turn.peer, relay[0], relay[1])
        return EX_OK
    log.error("the relayed session did not end cleanly (%s); undelivered mail stays at the provider",
              result.reason)
    return EX_TEMPFAIL


def _deliver_locally(turn, options: FetchOptions, trace) -> int:
    from odmr.localdelivery import serve_reversed
    from odmr.mailstore import StorageError, open_mailbox
    try:
        mailbox = open_mailbox(options.maildir, options.mbox)
    except StorageError as exc:
        log.error("%s; the provider keeps the mail", exc)
        try:
            turn.sock.sendall(b"421 4.3.0 Local mailbox unavailable, try again later\r\n")
        except OSError:
            pass
        return EX_TEMPFAIL
    try:
        peer_ip = turn.sock.getpeername()[0]
    except OSError:
        peer_ip = turn.peer
    session = serve_reversed(turn.sock, peer_ip, turn.leftover, mailbox,
                             options.endpoint.helo, turn.tls, trace, options.max_size)
    where = options.maildir or options.mbox
    if not session.quit:
        log.error("connection to the provider lost after %d message(s); the rest stays there",
                  session.delivered)
        return EX_TEMPFAIL
    if session.deferred:
        log.error("%d message(s) could not be stored in %s and stay at the provider",
                  session.deferred, where)
        return EX_TEMPFAIL
    log.info("%d message(s) delivered to %s", session.delivered, where)
    return EX_OK


# -- polling ---------------------------------------------------------------------

def next_delay(interval: float, failures: int, rng: random.Random) -> float:
    """The pause before the next run: the interval, doubled per failure in a row
    (capped), with +-10% jitter so many customers don't poll in lock step."""
    delay = interval
    if failures:
        delay = min(interval * (2 ** min(failures, 20)), max(interval, MAX_BACKOFF))
    return delay * rng.uniform(0.9, 1.1)


def poll_forever(options: FetchOptions) -> int:
    """--every: run, sleep, repeat until SIGTERM/SIGINT (exit 0)."""
    def stop(signum, frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rng = random.Random()
    failures = 0
    run = 0
    try:
        while True:
            run += 1
            started = time.monotonic()
            code = fetch_once(options)
            if code in (EX_USAGE, EX_NOINPUT, EX_CONFIG):
                return code
            failures = 0 if code == EX_OK else failures + 1
            delay = next_delay(options.every, failures, rng)
            log.warning("run %d: exit %d after %.1fs; next run in %.0fs", run, code,
                        time.monotonic() - started, delay)
            time.sleep(delay)
    except _Stop:
        log.warning("stopped after %d run(s)", run)
        return EX_OK


# -- entry point -----------------------------------------------------------------

def _setup_logging(verbose: bool, polling: bool) -> None:
    from odmr.logline import OneLineFormatter
    handler = logging.StreamHandler(sys.stderr)
    # A poller runs for days: its lines need a time; a one-shot run's don't.
    handler.setFormatter(OneLineFormatter("%(asctime)s odmrd fetch: %(message)s" if polling
                                          else "odmrd fetch: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def main(argv: List[str], config_path: Optional[str]) -> int:
    """`odmrd fetch ...`; returns the sysexits code."""
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return EX_OK
    try:
        options = resolve_options(list(argv), config_path)
    except UsageError as exc:
        print("odmrd fetch: %s" % exc, file=sys.stderr)
        return exc.code
    _setup_logging(options.verbose, options.every > 0)
    if options.every > 0:
        return poll_forever(options)
    try:
        return fetch_once(options)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EX_TEMPFAIL


__all__ = ["main", "resolve_options", "fetch_once", "poll_forever", "next_delay",
           "FetchOptions", "UsageError", "EX_PROTOCOL"]


if __name__ == "__main__":  # `python3 -m odmr.customer ...`, same as `odmrd fetch ...`
    sys.exit(main(sys.argv[1:], os.environ.get("ODMRD_CONFIG")))
