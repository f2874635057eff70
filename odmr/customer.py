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
from odmr.names import plural

EX_NOINPUT = 66
EX_CONFIG = 78
EVERY_FROM_CONFIG = "config"    # `--every` without a value: the [fetch] section's interval
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
    config_note: str = ""       # which file the settings came from, for -v and --check
    check_only: bool = False
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
    p.add_argument("--every", metavar="INTERVAL", nargs="?", const=EVERY_FROM_CONFIG,
                   help="poll forever at this interval (e.g. 15m); alone: at the [fetch] "
                        "section's `every` (what the init scripts run)")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="read the [fetch] section of FILE (default: $ODMRD_CONFIG or "
                        "/etc/odmrd/odmrd.conf, only if it has a [fetch] section)")
    p.add_argument("--check", action="store_true",
                   help="check the settings (files, flags, config) and exit without connecting")
    p.add_argument("--max-size", metavar="SIZE",
                   help="with --maildir/--mbox: refuse messages over SIZE with 552 "
                        "(e.g. 10K, 50M; default 50M; 0: no limit)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the conversation on stderr")
    return p


# -- options ---------------------------------------------------------------------

def _choose_config(named: Optional[str]) -> Tuple[Optional[str], str]:
    """(the file to read or None, what -v says about that choice).

    A file named with -c is read whatever it holds. The default one
    ($ODMRD_CONFIG, else /etc/odmrd/odmrd.conf) is read only when it has a
    [fetch] section: on the provider's own host it is the provider's file, and
    its hostname, paths or errors are none of the customer's business."""
    from odmr import config
    if named:
        return named, "settings from %s" % os.path.abspath(named)
    default = os.path.abspath(config.default_config_path())
    if not os.path.exists(default):
        return None, "no configuration file read: no %s" % default
    if not os.access(default, os.R_OK):
        return None, "no configuration file read: %s is not readable (use -c FILE)" % default
    # the scanner that numbers lines for error messages also sees section headers
    if (("fetch",), "") not in config.line_numbers(default):
        return None, "no configuration file read: %s has no [fetch] section" % default
    return default, "settings from the [fetch] section of %s" % default


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
    from odmr.config import parse_hostport
    from odmr.names import normalize_domain
    args = build_parser().parse_args(argv)
    config_path, note = _choose_config(args.config or config_path)
    section, base, hostname = _fetch_section(config_path)
    # a missing setting says where it was looked for
    missing = " (%s)" % note if config_path is None else \
        " (or in [fetch] of %s)" % os.path.abspath(config_path)

    def pick(flag, key):
        return flag if flag not in (None, "", []) else section.get(key)

    server = pick(args.server, "server")
    user = pick(args.user, "user")
    if not server:
        raise UsageError("--server is required" + missing)
    if not user:
        raise UsageError("--user is required" + missing)
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
        raise UsageError("one of --relay HOST:PORT, --maildir DIR or --mbox FILE is required"
                         + missing)
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
    every = _interval(args.every, section, note)
    endpoint = Endpoint(host=host, port=port, user=user, password=password, domains=domains,
                        tls=args.tls or section.get("tls") or "starttls", ca_file=ca_file,
                        insecure=bool(args.insecure or section.get("insecure")),
                        mechanism=mechanism, helo=hostname)
    return FetchOptions(endpoint=endpoint, relay=relay, maildir=maildir, mbox=mbox,
                        every=every, verbose=args.verbose, config_note=note,
                        check_only=args.check, max_size=max_size)


def _interval(flag: Optional[str], section: dict, where: str) -> float:
    """Seconds between runs (0: run once) from --every and the [fetch] `every`."""
    from odmr.config import parse_duration
    configured = float(section.get("every") or 0)
    if flag == EVERY_FROM_CONFIG:
        if configured <= 0:
            # what the service scripts run: one run and an exit would look like a crash
            raise UsageError("--every without an interval needs `every` in the [fetch] section"
                             " (%s)" % where, EX_CONFIG)
        return configured
    if not flag:
        return configured
    try:
        every = parse_duration(flag)
    except ValueError as exc:
        raise UsageError("--every: %s" % exc) from None
    if every <= 0:
        raise UsageError("--every must be more than 0")
    return every


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%gs" % seconds


def describe(options: FetchOptions) -> str:
    """What a run will do, in one line without the password (--check, the poller's first line)."""
    endpoint = options.endpoint
    if options.relay is not None:
        target = "relay to %s:%d" % options.relay
    else:
        target = "maildir %s" % options.maildir if options.maildir else "mbox %s" % options.mbox
    when = "every %s" % _duration(options.every) if options.every > 0 else "once"
    return "%s at %s:%d (tls %s), %s, %s; %s" % (
        endpoint.user, endpoint.host, endpoint.port, endpoint.tls, target, when,
        options.config_note)


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

@dataclass
class RunResult:
    """How one run ended: its exit code and the one line that says what happened."""

    code: int
    summary: str
    provider_trouble: bool = False      # reaching or talking to the provider failed: back off
    level: int = logging.WARNING        # WARNING: shown without -v; ERROR for failures


def _trace(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fetch_once(options: FetchOptions) -> int:
    """Connect, ATRN, receive; log the run's summary line; return the exit code."""
    result = run_once(options)
    log.log(result.level, "%s", result.summary)
    return result.code


def run_once(options: FetchOptions) -> RunResult:
    """One run, not logged yet (the poller puts its summary in its per-run line)."""
    trace = _trace if options.verbose else None
    endpoint = options.endpoint
    try:
        turn = open_reversed(endpoint, trace)
    except NoMail as exc:
        log.info("the provider answered %s", exc)
        return RunResult(EX_OK, "no mail waiting")
    except FetchError as exc:
        return RunResult(exc.code, str(exc), provider_trouble=True, level=logging.ERROR)
    try:
        if options.relay is not None:
            return _relay(turn, options.relay, trace)
        return _deliver_locally(turn, options, trace)
    finally:
        try:
            turn.sock.close()
        except OSError:
            pass


def _relay(turn, relay: Tuple[str, int], trace) -> RunResult:
    from odmr.splice import splice
    where = "%s:%d" % relay
    try:
        local = socket.create_connection(relay, timeout=RELAY_CONNECT_TIMEOUT)
    except OSError as exc:
        try:
            turn.sock.sendall(b"421 4.3.0 Local mail server unavailable, try again later\r\n")
        except OSError:
            pass
        return RunResult(EX_TEMPFAIL, "cannot connect to the local SMTP server %s: %s; the "
                         "provider keeps the mail" % (where, exc.strerror or exc), level=logging.ERROR)
    try:
        result = splice(turn.sock, local, turn.file, progress=trace)
    finally:
        try:
            local.close()
        except OSError:
            pass
    tally = result.tally
    if tally.first_problem:
        log.info("the local server's first refusal: %s", tally.first_problem)
    if not result.clean:
        # the local server hanging up is its own trouble, not the provider's
        return RunResult(EX_TEMPFAIL, "%s; the session did not end cleanly (%s): undelivered mail "
                         "stays at the provider" % (tally.summary(where), result.reason),
                         provider_trouble=not result.reason.startswith("local"), level=logging.ERROR)
    log.info("relayed %d bytes from %s to %s; session ended cleanly",
             result.from_provider, turn.peer, where)
    return RunResult(EX_TEMPFAIL if tally.kept_at_provider() else EX_OK, tally.summary(where))


def _deliver_locally(turn, options: FetchOptions, trace) -> RunResult:
    from odmr.localdelivery import serve_reversed
    from odmr.mailstore import StorageError, open_mailbox
    try:
        mailbox = open_mailbox(options.maildir, options.mbox)
    except StorageError as exc:
        try:
            turn.sock.sendall(b"421 4.3.0 Local mailbox unavailable, try again later\r\n")
        except OSError:
            pass
        return RunResult(EX_TEMPFAIL, "%s; the provider keeps the mail" % exc, level=logging.ERROR)
    try:
        peer_ip = turn.sock.getpeername()[0]
    except OSError:
        peer_ip = turn.peer
    session = serve_reversed(turn.sock, peer_ip, turn.file, mailbox,
                             options.endpoint.helo, turn.tls, trace, options.max_size)
    summary = session.tally.summary(options.maildir or options.mbox)
    if not session.quit:
        return RunResult(EX_TEMPFAIL, "%s; then the connection to the provider was lost: the rest "
                         "stays there" % summary, provider_trouble=True, level=logging.ERROR)
    return RunResult(EX_TEMPFAIL if session.tally.kept_at_provider() else EX_OK, summary)


# -- polling ---------------------------------------------------------------------

def next_delay(interval: float, failures: int, rng: random.Random) -> float:
    """The pause before the next run: the interval, doubled per failure in a row
    (capped), with +-10% jitter so many customers don't poll in lock step."""
    delay = interval
    if failures:
        delay = min(interval * (2 ** min(failures, 20)), max(interval, MAX_BACKOFF))
    return delay * rng.uniform(0.9, 1.1)


def poll_forever(options: FetchOptions) -> int:
    """--every: run, sleep, repeat until SIGTERM/SIGINT (exit 0).

    Only trouble with the provider (connection, TLS, authentication, protocol)
    doubles the pause: mail that the local side deferred is an ordinary
    outcome, and the next run at the usual time is what picks it up."""
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
            result = run_once(options)
            if result.code in (EX_USAGE, EX_NOINPUT, EX_CONFIG):
                log.error("%s", result.summary)
                return result.code
            failures = failures + 1 if result.provider_trouble else 0
            delay = next_delay(options.every, failures, rng)
            log.log(result.level, "run %d: %s; exit %d after %.1fs; next run in %.0fs", run,
                    result.summary, result.code, time.monotonic() - started, delay)
            time.sleep(delay)
    except _Stop:
        log.warning("stopped after %s", plural(run, "run"))
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
    """`odmrd fetch ...`; returns the sysexits code. `config_path` is the file
    named by `odmrd -c FILE fetch`, or None for fetch's own -c or the default."""
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return EX_OK
    try:
        options = resolve_options(list(argv), config_path)
    except UsageError as exc:
        print("odmrd fetch: %s" % exc, file=sys.stderr)
        return exc.code
    if options.check_only:
        print("odmrd fetch: ok: %s" % describe(options))
        return EX_OK
    _setup_logging(options.verbose, options.every > 0)
    if options.every > 0:
        log.warning("polling: %s", describe(options))    # the service log's first line
        return poll_forever(options)
    log.info("%s", options.config_note)
    try:
        return fetch_once(options)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EX_TEMPFAIL


__all__ = ["main", "resolve_options", "describe", "fetch_once", "run_once", "poll_forever",
           "next_delay", "FetchOptions", "RunResult", "UsageError", "EX_PROTOCOL"]


if __name__ == "__main__":  # `python3 -m odmr.customer ...`, same as `odmrd fetch ...`
    sys.exit(main(sys.argv[1:], None))
