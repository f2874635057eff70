"""`odmrd fetch`: the customer side of ODMR (SPEC section 6).

This module owns the command line and the `[fetch]` config section, the
choice between relaying and local delivery, the exit code, and `--every`
polling. The protocol work lives beside it: `fetch_client` (smtplib up to
ATRN), `fetch_relay` (splice into a local SMTP server), `fetch_server` +
`fetch_mailbox` (be the SMTP server and write a Maildir/mbox), `fetch_tally`
(count messages and recipients for the summary).
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
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from odmr.fetch_client import DEFAULT_PORT, Endpoint, FetchError, NoMail, open_reversed
from odmr.fetch_server import DEFAULT_MAX_SIZE
from odmr.config import (parse_client_mechanism, parse_domains, parse_duration, parse_hostport,
                         parse_size)
from odmr.exits import EX_CONFIG, EX_NOINPUT, EX_OK, EX_TEMPFAIL, EX_USAGE
from odmr.names import plural
from odmr import replies
from odmr.wire import format_reply

FROM_SECTION = "config"         # a flag given bare (`--every` alone): its [fetch] key's value
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
    max_size: int = DEFAULT_MAX_SIZE


def _every(text: str) -> float:
    """--every INTERVAL: more than 0."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def _server(text: str) -> Tuple[str, int]:
    return parse_hostport(text, DEFAULT_PORT)


@dataclass(frozen=True)
class Option:
    """One setting: its flag, its [fetch] key, the converter of the flag's text
    (the configspec types the key with the same converter, in odmr.config),
    and its value when neither gives one. A `path` from [fetch] is relative
    to the config file's directory, one from a flag to the current one. The
    configspec's default for the key is this default too (tests hold them equal)."""

    flag: str
    key: str
    convert: Callable[[Any], Any]
    default: Any
    metavar: Optional[str]
    help: str
    path: bool = False
    flag_kw: Tuple[Tuple[str, Any], ...] = ()       # more add_argument() keywords
    only_when_bare: bool = False    # the [fetch] key serves only the flag given bare (every)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS: Tuple[Option, ...] = (
    Option("--server", "server", _server, None, "HOST[:PORT]",
           "the provider (port default %d)" % DEFAULT_PORT),
    Option("--user", "user", str, None, "NAME", "account name"),
    Option("--password-file", "password_file", str, "", "FILE",
           "file whose first line is the password (else $ODMR_PASSWORD)", path=True),
    Option("--domain", "domains", parse_domains, [], "D",
           "domain to collect (repeatable; default: all of the account's)",
           flag_kw=(("action", "append"),)),
    Option("--tls", "tls", str, "starttls", None,
           "starttls (default; required, certificate verified), implicit, or none",
           flag_kw=(("choices", ("starttls", "implicit", "none")),)),
    Option("--ca-file", "ca_file", str, "", "FILE", "CA certificates to verify the provider with",
           path=True),
    Option("--insecure", "insecure", bool, False, None, "do not verify the provider's certificate",
           flag_kw=(("action", "store_true"),)),
    Option("--mechanism", "mechanism", parse_client_mechanism, "", "M",
           "SASL mechanism (default: best offered)"),
    Option("--relay", "relay", parse_hostport, None, "HOST:PORT",
           "hand the mail to this local SMTP server"),
    Option("--maildir", "maildir", str, "", "DIR", "deliver into this Maildir", path=True),
    Option("--mbox", "mbox", str, "", "FILE", "deliver into this mbox file", path=True),
    Option("--every", "every", _every, 0.0, "INTERVAL",
           "poll forever at this interval (e.g. 15m); alone: at the [fetch] section's `every` "
           "(what the init scripts run); without it one run, whatever [fetch] says",
           flag_kw=(("nargs", "?"), ("const", FROM_SECTION)), only_when_bare=True),
    Option("--max-size", "max_size", parse_size, DEFAULT_MAX_SIZE, "SIZE",
           "with --maildir/--mbox: refuse messages over SIZE with 552 (e.g. 10K, 50M; "
           "default 50M; 0: no limit)"),
)
TARGETS = ("relay", "maildir", "mbox")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="odmrd fetch", description="Collect mail from an ODMR provider (RFC 2645).")
    for option in OPTIONS:
        more = dict(option.flag_kw)
        if option.metavar:
            more["metavar"] = option.metavar
        # None: not given, so the [fetch] key (or the default) applies
        p.add_argument(option.flag, default=None, help=option.help, **more)
    p.add_argument("-c", "--config", metavar="FILE",
                   help="read the [fetch] section of FILE (default: $ODMRD_CONFIG or "
                        "/etc/odmrd/odmrd.conf, only if it has a [fetch] section)")
    p.add_argument("--check", action="store_true",
                   help="check the settings (files, flags, config) and exit without connecting")
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
    args = build_parser().parse_args(argv)
    config_path, note = _choose_config(args.config or config_path)
    section, base, hostname = _fetch_section(config_path)
    # a missing setting says where it was looked for
    missing = " (%s)" % note if config_path is None else \
        " (or in [fetch] of %s)" % os.path.abspath(config_path)
    values, flagged = _values(args, section, base)
    for key in ("server", "user"):
        if not values[key]:
            raise UsageError("--%s is required%s" % (key, missing))
    password = _password(values, flagged)
    _check_ca_file(values["ca_file"])
    relay, maildir, mbox = _target(values, flagged, missing)
    if relay is not None and "max_size" in flagged:
        raise UsageError("--max-size applies to --maildir and --mbox; with --relay the "
                         "local server enforces its own limit")
    host, port = values["server"]
    endpoint = Endpoint(host=host, port=port, user=values["user"], password=password,
                        domains=values["domains"], tls=values["tls"], ca_file=values["ca_file"],
                        insecure=values["insecure"], mechanism=values["mechanism"], helo=hostname)
    return FetchOptions(endpoint=endpoint, relay=relay, maildir=maildir, mbox=mbox,
                        every=_interval(values["every"], "every" in flagged, note),
                        verbose=args.verbose, config_note=note, check_only=args.check,
                        max_size=values["max_size"])


def _values(args: argparse.Namespace, section: dict, base: str) -> Tuple[Dict[str, Any], Set[str]]:
    """Each setting from its flag, else from [fetch] (typed by the configspec),
    else its default; and the keys that came from flags (given bare or not)."""
    values: Dict[str, Any] = {}
    flagged: Set[str] = set()
    for option in OPTIONS:
        given = getattr(args, option.dest)
        if given not in (None, "", []):
            flagged.add(option.key)
        if given not in (None, "", [], FROM_SECTION):
            try:
                values[option.key] = option.convert(given)
            except ValueError as exc:
                raise UsageError("%s: %s" % (option.flag, exc)) from None
        elif section.get(option.key) not in (None, "", []) and \
                (given == FROM_SECTION or not option.only_when_bare):
            value = section[option.key]
            values[option.key] = _relative(base, value) if option.path else value
        else:
            values[option.key] = option.default
    return values, flagged


def _password(values: Dict[str, Any], flagged: Set[str]) -> str:
    """--password-file, else $ODMR_PASSWORD, else [fetch] password_file."""
    if "password_file" in flagged:
        return _read_password(values["password_file"])
    if os.environ.get("ODMR_PASSWORD"):
        return os.environ["ODMR_PASSWORD"]
    if values["password_file"]:
        return _read_password(values["password_file"])
    raise UsageError("no password: give --password-file FILE or set ODMR_PASSWORD")


def _check_ca_file(ca_file: str) -> None:
    """Found out now, not after connecting: unreadable, a directory, no certificates."""
    if not ca_file:
        return
    if not os.access(ca_file, os.R_OK):
        raise UsageError("cannot read CA file %s" % ca_file, EX_NOINPUT)
    from odmr.fetch_client import tls_context
    try:
        tls_context(ca_file, False)
    except FetchError as exc:
        raise UsageError(str(exc), EX_NOINPUT) from None


def _target(values: Dict[str, Any], flagged: Set[str], missing: str
            ) -> Tuple[Optional[Tuple[str, int]], str, str]:
    """(relay, maildir, mbox), exactly one set: a flag's choice replaces the file's."""
    given = [name for name in TARGETS if name in flagged]
    if len(given) > 1:
        raise UsageError("give only one of --relay, --maildir, --mbox")
    if not given:
        given = [name for name in TARGETS if values[name]]
        if len(given) > 1:
            raise UsageError("[fetch] sets more than one of relay, maildir, mbox")
    if not given:
        raise UsageError("one of --relay HOST:PORT, --maildir DIR or --mbox FILE is required"
                         + missing)
    target = given[0]
    if target == "mbox" and os.path.isdir(values["mbox"]):
        raise UsageError("--mbox %s is a directory (use --maildir?)" % values["mbox"])
    return (values["relay"] if target == "relay" else None,
            values["maildir"] if target == "maildir" else "",
            values["mbox"] if target == "mbox" else "")


def _interval(every: float, given: bool, where: str) -> float:
    """Seconds between runs (0: run once); a bare --every has taken the [fetch] `every`.

    Without --every a run is one run, whatever the file says: cron and a shell expect
    `odmrd fetch -c FILE` to return."""
    if given and every <= 0:
        # what the service scripts run: one run and an exit would look like a crash
        raise UsageError("--every without an interval needs `every` in the [fetch] section"
                         " (%s)" % where, EX_CONFIG)
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
        log.info("the provider answered %s", str(exc))
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
    from odmr.fetch_relay import splice
    where = "%s:%d" % relay
    try:
        local = socket.create_connection(relay, timeout=RELAY_CONNECT_TIMEOUT)
    except OSError as exc:
        try:
            turn.sock.sendall(format_reply(*replies.LOCAL_SERVER_UNAVAILABLE))
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
    from odmr.fetch_server import serve_reversed
    from odmr.fetch_mailbox import StorageError, open_mailbox
    try:
        mailbox = open_mailbox(options.maildir, options.mbox)
    except StorageError as exc:
        try:
            turn.sock.sendall(format_reply(*replies.LOCAL_MAILBOX_UNAVAILABLE))
        except OSError:
            pass
        full = "the local disk is full: " if exc.disk_full else ""
        return RunResult(EX_TEMPFAIL, "%s%s; the provider keeps the mail" % (full, exc),
                         level=logging.ERROR)
    try:
        peer_ip = turn.sock.getpeername()[0]
    except OSError:
        peer_ip = turn.peer
    session = serve_reversed(turn.sock, peer_ip, turn.file, mailbox,
                             options.endpoint.helo, turn.tls, trace, options.max_size)
    summary = session.tally.summary(options.maildir or options.mbox)
    # one line for the trouble, however many messages it deferred, before the run's summary
    if session.disk_full:
        log.error("the local disk is full: %s; the provider keeps what did not fit",
                  session.disk_full)
    elif session.storage_problem:
        summary = "%s; messages could not be stored: %s" % (summary, session.storage_problem)
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
           "next_delay", "FetchOptions", "RunResult", "UsageError"]


if __name__ == "__main__":  # `python3 -m odmr.fetch ...`, same as `odmrd fetch ...`
    sys.exit(main(sys.argv[1:], None))
