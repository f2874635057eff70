"""The `odmrd` command line: argparse, one module call per subcommand.

Errors a user can cause come out as one line on stderr and a sysexits code.
"""
from __future__ import annotations

import argparse
import errno
import getpass
import importlib
import json
import logging
import os
import signal
import sys
import time
from typing import List, NoReturn, Optional

from odmr import __version__
from odmr.exits import (EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_IOERR, EX_NOINPUT,
                         EX_NOPERM, EX_NOUSER, EX_OK, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE,
                         EX_USAGE)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError("%s: %s" % (self.prog, message))


def _reader_gone() -> int:
    """stdout's reader went away (`| head`): quietly, with the status of a process that
    SIGPIPE would have ended; stdout is pointed at /dev/null so the final flush is silent."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def fail(message: str, code: int) -> int:
    print("odmrd: %s" % message, file=sys.stderr)
    return code


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="configuration file (default: $ODMRD_CONFIG or /etc/odmrd/odmrd.conf)")
    parser = Parser(prog="odmrd", description="On-Demand Mail Relay (RFC 2645)", parents=[common])
    parser.add_argument("--version", action="version", version="odmrd %s" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("serve", parents=[common], help="run the provider")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached, log to stderr")
    p = sub.add_parser("check-config", parents=[common], help="validate configuration and users file")
    p.add_argument("--print", dest="print_key", metavar="KEY",
                   help="print one setting (e.g. pid_file) and exit")
    p.add_argument("--running-pid-file", metavar="PATH",
                   help="the running daemon's pid file, when the configuration names another "
                        "since its start: the addresses it listens on are no conflict")
    _user_parsers(sub, common)
    _enqueue_parser(sub, common)
    _queue_parsers(sub, common)
    p = sub.add_parser("status", parents=[common], help="ask the running provider what it is doing",
                       description="pid, uptime, listeners, live sessions, deliveries in progress "
                                   "and the backlog, from the daemon of this node. Exit 0 running, "
                                   "3 not running, 4 unknown (LSB).")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p = sub.add_parser("fetch", parents=[common], help="the customer client (collect mail)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="fetch's own options (odmrd fetch --help)")
    return parser


def _user_parsers(sub, common: Parser) -> None:
    p = sub.add_parser("user", parents=[common], help="manage customer accounts")
    users = p.add_subparsers(dest="user_command", metavar="ACTION", parser_class=Parser)
    q = users.add_parser("add", parents=[common], help="create an account",
                         description="Create a customer account in the users file. The "
                                     "password is prompted for, or read from stdin.")
    q.add_argument("name", help="the account name the customer logs in with")
    q.add_argument("--domain", action="append", required=True, metavar="DOMAIN",
                   help="a domain the account may collect with ATRN; repeat for several "
                        "(a U-label and its A-label are one domain)")
    q.add_argument("--shared-domain", action="store_true",
                   help="a --domain that already belongs to another account is shared with it "
                        "(both may collect its mail) instead of refused")
    _password_options(q)
    q = users.add_parser("passwd", parents=[common], help="change a password",
                         description="Set a new password (and CRAM-MD5 secret) for an account.")
    q.add_argument("name", help="the account")
    _password_options(q)
    q = users.add_parser("del", parents=[common], help="delete an account",
                         description="Delete an account; its queued mail stays in the spool.")
    q.add_argument("name", help="the account")
    users.add_parser("list", parents=[common], help="list accounts and their domains")


def _enqueue_parser(sub, common: Parser) -> None:
    p = sub.add_parser("enqueue", parents=[common], help="spool one message read from stdin",
                       description="Spool one RFC 5322 message read from stdin, like sendmail "
                                   "-oi (for an MTA's pipe transport). Exit 0 spooled, 67 domain "
                                   "not hosted or a routed address, 65 bad message, 74 broken "
                                   "input, 75 try again later (a pipe transport retries on 75 "
                                   "and bounces on anything else).")
    p.add_argument("-f", dest="sender", default=None, metavar="SENDER",
                   help="envelope sender (empty for a bounce: -f '')")
    p.add_argument("-o", dest="sendmail_options", action="append", default=[],
                   help=argparse.SUPPRESS)
    p.add_argument("-i", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("recipients", nargs="+", metavar="RCPT",
                   help="envelope recipients, each in a hosted domain")


def _queue_parsers(sub, common: Parser) -> None:
    p = sub.add_parser("queue", parents=[common], help="inspect and manage the spool")
    queue = p.add_subparsers(dest="queue_command", metavar="ACTION", parser_class=Parser)
    q = queue.add_parser("list", parents=[common], help="list waiting messages")
    q.add_argument("domain", nargs="?", metavar="DOMAIN",
                   help="only this domain (or .outbound: the bounces waiting for bounce_relay)")
    q.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    q.add_argument("--quarantine", action="store_true",
                   help="list the damaged or unreadable files the daemon set aside instead "
                        "(domain, id, size, when, reason)")
    q = queue.add_parser("show", parents=[common], help="print one message")
    q.add_argument("id", metavar="ID", help="a message id from queue list")
    q = queue.add_parser("summary", parents=[common], help="the queue's shape per domain (like qshape)",
                         description="Messages, bytes, oldest age and age buckets per domain, "
                                     "from directory listings and file times only.")
    q.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    for name, text in (("delete", "remove messages"), ("bounce", "return messages to sender")):
        q = queue.add_parser(name, parents=[common], help=text)
        q.add_argument("ids", nargs="+", metavar="ID", help="message ids from queue list")
    queue.add_parser("expire", parents=[common], help="bounce messages older than max_age now")
    q = queue.add_parser("requeue", parents=[common], help="put repaired quarantined messages back",
                         description="Move messages from the quarantine back into their queue "
                                     "once repaired: each must be a regular file the service "
                                     "account can read and that parses. Exit 66 unknown id, 77 "
                                     "still unreadable, 65 still corrupt.")
    q.add_argument("ids", nargs="+", metavar="ID", help="message ids from queue list --quarantine")


def _password_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin instead of a prompt")
    parser.add_argument("--no-cram-md5", action="store_true",
                        help="store no CRAM-MD5 secret (it is password-equivalent; fetchmail "
                             "needs it)")


def _missing_dependencies() -> List[str]:
    """The runtime dependencies this interpreter cannot import: one clear line beats a
    ModuleNotFoundError traceback on a fresh server."""
    import importlib.util
    return [name for name in ("configobj", "idna") if importlib.util.find_spec(name) is None]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    head, fetch_args = _split_fetch(argv)
    try:
        args = parser.parse_args(head)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EX_USAGE
    if fetch_args is not None:
        args.rest = fetch_args
    if not args.command:
        parser.print_usage(sys.stderr)
        return EX_USAGE
    missing = _missing_dependencies()
    if missing:
        return fail(_how_to_install(missing), EX_UNAVAILABLE)
    from odmr.config import default_config_path
    config_path = getattr(args, "config", None) or default_config_path()
    try:
        return _run_command(args, config_path)
    except KeyboardInterrupt:
        return fail("interrupted", EX_TEMPFAIL)
    except UsageError as exc:
        return fail(str(exc), EX_USAGE)
    except BrokenPipeError:
        return _reader_gone()
    except Exception as exc:
        from odmr.daemon import DaemonError
        if isinstance(exc, DaemonError):
            return fail(str(exc), exc.code)
        if os.environ.get("ODMRD_DEBUG"):
            raise
        return fail("internal error: %s: %s (set ODMRD_DEBUG=1 for details)"
                    % (type(exc).__name__, exc), EX_SOFTWARE)


def _how_to_install(missing: List[str]) -> str:
    return ("needs the Python package%s %s: on Debian/Ubuntu `apt-get install %s`, "
            "elsewhere `pip install %s` (or run the single-file build, dist/odmrd.pyz)"
            % ("s" if len(missing) > 1 else "", " and ".join(missing),
               " ".join("python3-" + m for m in missing), " ".join(missing)))


def _run_command(args: argparse.Namespace, config_path: str) -> int:
    """The subcommand's own exit code; what it raises, main() turns into one line."""
    if args.command == "serve":
        from odmr.daemon import serve
        return serve(config_path, args.foreground)
    if args.command == "fetch":
        from odmr import fetch
        # flags alone suffice; customer picks the default file only for its [fetch]
        return fetch.main(args.rest, getattr(args, "config", None))
    if args.command == "status":
        return cmd_status(args, config_path)
    handler = {"check-config": cmd_check_config, "user": cmd_user,
               "enqueue": cmd_enqueue, "queue": cmd_queue}[args.command]
    code = handler(args, config_path)
    sys.stdout.flush()          # a reader gone shows here, not in the interpreter's exit
    return code


def _split_fetch(argv: List[str]):
    """(argv up to `fetch`, fetch's own arguments) — or (argv, None) for other commands.

    argparse.REMAINDER does not capture arguments that start with '-' in a
    subcommand, so `fetch --server ...` is cut off before argparse sees it."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("-c", "--config"):
            index += 2
        elif arg.startswith("--config=") or (arg.startswith("-c") and not arg.startswith("--")):
            index += 1
        elif arg == "fetch":
            return argv[:index + 1], argv[index + 1:]
        else:
            break
    return argv, None


def _settings(config_path: str):
    from odmr import config
    return config.load(config_path)


def _runtime(config_path: str, need_accounts: bool = True):
    from odmr import accounts
    from odmr.runtime import Runtime
    from odmr.spool import Spool
    settings = _settings(config_path)
    if os.path.exists(settings.users_file) or need_accounts:
        users = accounts.load(settings.users_file)
    else:
        users = accounts.Accounts([], settings.users_file)
    account = _service_account(settings)
    _log_like_the_daemon(settings, account)     # opened as root, like the daemon's
    if account is not None:
        from odmr import daemon
        daemon.drop_privileges(account)         # root touches the spool as the daemon would
    return Runtime(settings, users, Spool(settings.spool_dir))


def _log_like_the_daemon(settings, account) -> None:
    """`enqueue` and `queue …` change the queue: what they accept, bounce and delete is
    logged where the detached daemon logs (SPEC §8), not dropped. The daemon opens its
    log as root, so the file is chosen and opened before the privileges are dropped
    (as the service account, /var/log is out of reach: the line went nowhere)."""
    import logging
    from odmr import daemon
    from odmr.logline import DaemonLineFormatter
    owner = (account.uid, account.gid) if account is not None else None
    try:
        daemon.setup_logging(settings.log_level, daemon.log_target(settings, foreground=False),
                             owner)
    except daemon.DaemonError:
        pass                        # the log out of reach must not stop a queue command
    to_operator = logging.StreamHandler(sys.stderr)    # and whoever runs it sees the warnings
    to_operator.setLevel(logging.WARNING)
    to_operator.setFormatter(DaemonLineFormatter("odmrd: %(message)s"))
    logging.getLogger().addHandler(to_operator)


def _service_account(settings):
    """The account root runs a queue command as (`user`), so the daemon can read what
    it writes; None when not root or none is set."""
    if os.geteuid() != 0 or not settings.user:
        return None
    from odmr import daemon
    return daemon.service_account(settings)


def cmd_check_config(args: argparse.Namespace, config_path: str) -> int:
    from odmr import config
    try:
        settings = config.load(config_path)
    except config.ConfigError as exc:
        if args.print_key:
            # an init script must still find the running daemon while the file is mid-edit
            value = config.lenient_value(config_path, args.print_key)
            if value is not None:
                print(value)
                return EX_OK
        for line in exc.lines(config_path):
            print("odmrd: %s" % line, file=sys.stderr)
        users = config.lenient_value(config_path, "users_file")
        if users and os.path.exists(users):                 # every error at once (SPEC §2)
            for line in _users_file_problems(users):
                print("odmrd: %s" % line, file=sys.stderr)
        return EX_CONFIG
    if args.print_key:
        value = getattr(settings, args.print_key, None)
        if value is None or args.print_key.startswith("_") or not isinstance(value, (str, int, float)):
            return fail("check-config --print: unknown or non-scalar key %r" % args.print_key, EX_USAGE)
        print(value)
        return EX_OK
    problems = _users_file_problems(settings.users_file)
    problems.extend(_startup_problems(settings, args.running_pid_file))
    if problems:
        for problem in problems:
            print("odmrd: %s" % problem, file=sys.stderr)
        return EX_CONFIG
    warning = _users_file_owner_warning(settings)
    if warning:
        print("odmrd: warning: %s" % warning, file=sys.stderr)
    print("%s: ok" % settings.path)
    return EX_OK


def _users_file_problems(path: str) -> List[str]:
    from odmr import accounts
    if not os.path.exists(path):
        return ["%s: no users file yet (create one with 'odmrd user add')" % path]
    try:
        accounts.load(path)
    except accounts.AccountsError as exc:
        return str(exc).splitlines()
    return []


def _users_file_owner_warning(settings) -> Optional[str]:
    """The users file should belong to root or to the account the daemon runs as
    (`user`; without it, the account running this check)."""
    from odmr import accounts
    allowed = {0}
    if settings.user:
        import pwd
        try:
            allowed.add(pwd.getpwnam(settings.user).pw_uid)
        except KeyError:
            return None                 # an error of its own, reported already
    else:
        allowed.add(os.geteuid())
    return accounts.owner_warning(settings.users_file, allowed)


def _startup_problems(settings, running_pid_file: Optional[str] = None) -> List[str]:
    """What `serve` would refuse before binding: an init script's restart must not
    stop a working daemon for a configuration that cannot start."""
    from odmr import daemon, server, tls
    problems = []
    try:
        problems += server.tls_listener_problems(settings, tls.server_context(settings.tls))
    except tls.TLSConfigError as exc:
        problems.append(str(exc))
    account = daemon.account_problem(settings)
    if account:
        problems.append(account)
    else:
        service = daemon.service_account(settings)
        problems += daemon.unreadable_problems(settings, service)
        problems += daemon.spool_problems(settings, service)
    problems += server.decoy_key_problems(settings)
    problems += daemon.log_file_problems(settings) + daemon.pid_file_problems(settings)
    problems += daemon.listen_problems(settings, running_pid_file)
    return problems


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        try:
            with open("/dev/tty", "rb"):
                pass
        except OSError:
            raise UsageError("no terminal to ask for the password on: "
                             "use --password-stdin") from None
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                raise UsageError("passwords do not match")
        except EOFError:
            raise UsageError("no password given") from None
    if not password:
        raise UsageError("empty password")
    return password


def cmd_user(args: argparse.Namespace, config_path: str) -> int:
    from odmr import accounts, config
    try:
        settings = config.load(config_path)
    except config.ConfigError as exc:
        return _config_failed(exc, config_path)
    path = settings.users_file
    service_owner = None            # (uid, gid) a users file root creates is given to
    if os.geteuid() == 0 and settings.user:
        import pwd
        try:
            entry = pwd.getpwnam(settings.user)
            service_owner = (entry.pw_uid, entry.pw_gid)
        except KeyError:
            pass                # `serve` and `check-config` say so; the file stays root's
    action = args.user_command
    if not action:
        raise UsageError("odmrd user: add, passwd, del or list")
    try:
        if action == "add":
            domains = accounts.add_user(path, args.name, args.domain,
                                        _read_password(args.password_stdin),
                                        cram=not args.no_cram_md5, shared=args.shared_domain,
                                        service_owner=service_owner)
            print("account %s created for %s" % (args.name, ", ".join(domains)))
        elif action == "passwd":
            accounts.set_password(path, args.name, _read_password(args.password_stdin),
                                  cram=False if args.no_cram_md5 else None)
            print("password of %s changed" % args.name)
        elif action == "del":
            accounts.delete_user(path, args.name)
            print("account %s deleted" % args.name)
        else:
            for account in accounts.load(path):
                mechs = []
                if account.scram:
                    mechs.append("SCRAM-SHA-256 PLAIN LOGIN")
                if account.cram_md5_secret is not None:
                    mechs.append("CRAM-MD5")
                print("%s\t%s\t%s" % (account.name, ",".join(account.domains), " ".join(mechs)))
    except accounts.AccountsError as exc:
        message = str(exc)
        code = EX_NOUSER if message.startswith("no account") else EX_DATAERR
        if "no such users file" in message:
            code = EX_NOINPUT
        return fail(message.replace("\n", "; "), code)
    except OSError as exc:
        return fail("%s: %s" % (path, exc.strerror), EX_CANTCREAT)
    return EX_OK


def _config_failed(exc, config_path: str) -> int:
    for line in exc.lines(config_path):
        print("odmrd: %s" % line, file=sys.stderr)
    return EX_CONFIG


def cmd_enqueue(args: argparse.Namespace, config_path: str) -> int:
    from odmr import accounts, config
    from odmr.enqueue import EnqueueError, enqueue
    # An MTA's pipe transport retries only on 75 and bounces on anything else: a problem
    # the administrator can fix (configuration, users file, spool) must not bounce mail.
    try:
        runtime = _runtime(config_path)
    except config.ConfigError as exc:
        _config_failed(exc, config_path)
        return EX_TEMPFAIL
    except accounts.AccountsError as exc:
        return fail(str(exc).splitlines()[0], EX_TEMPFAIL)
    try:
        ids = enqueue(runtime, args.sender or "", args.recipients, sys.stdin.buffer)
    except EnqueueError as exc:
        # logged where the daemon logs, as intake logs its refusals (SPEC §8)
        logging.getLogger("odmrd").info("enqueue: refused (exit %d): %s", exc.code, exc)
        return fail(str(exc), exc.code)
    for domain, msg_id in ids:
        print("%s %s" % (msg_id, domain))
    return EX_OK


def cmd_queue(args: argparse.Namespace, config_path: str) -> int:
    # imported before _runtime() drops privileges: an interpreter's library may be root's
    from odmr import accounts, config
    importlib.import_module("odmr.queue_commands")
    importlib.import_module("odmr.qshape")
    from odmr.spool import OUTBOUND, CorruptMessage, DomainBusy, LinkRefused, SpoolError, describe_error
    action = args.queue_command
    if not action:
        raise UsageError("odmrd queue: list, show, delete, bounce, expire or requeue")
    try:
        runtime = _runtime(config_path, need_accounts=False)
    except config.ConfigError as exc:
        return _config_failed(exc, config_path)
    except accounts.AccountsError as exc:
        return fail(str(exc).splitlines()[0], EX_CONFIG)
    act = {"summary": _queue_summary, "list": _queue_list, "show": _queue_show, "delete": _queue_change,
           "bounce": _queue_change, "expire": _queue_expire, "requeue": _queue_requeue}[action]
    try:
        return act(runtime, args)
    except DomainBusy as exc:
        busy = "the bounce relay is handing on bounces" if str(exc) == OUTBOUND \
            else "domain %s is being delivered" % exc
        return fail("%s right now; try again" % busy, EX_TEMPFAIL)
    except CorruptMessage as exc:
        return fail("%s; 'odmrd queue delete' removes it, the daemon quarantines it" % exc, EX_DATAERR)
    except LinkRefused as exc:
        named = set(getattr(args, "ids", None) or [getattr(args, "id", None)])
        if os.path.basename(exc.filename or "") not in named:
            return fail(str(exc), EX_TEMPFAIL)      # in the way of the change: it waits
        # the message itself is a link: it lasts until someone removes it
        return fail("spool: %s is a symbolic link; refused, not followed: remove the link "
                    "by hand" % exc.filename, EX_DATAERR)
    except SpoolError as exc:
        return fail(str(exc), EX_TEMPFAIL if exc.temporary else EX_IOERR)
    except BrokenPipeError:
        raise                       # our reader (| head) left: not the spool's fault
    except OSError as exc:
        return fail("spool: %s" % describe_error(exc), EX_IOERR)


def _queue_list(runtime, args) -> int:
    from odmr import queue_commands
    from odmr.spool import OUTBOUND
    domain = _queue_name(args.domain) if args.domain else None
    now = time.time()
    if args.quarantine:
        return _quarantine_list(runtime, domain, args.json, now)
    unreadable: List = []
    records = [queue_commands.describe(m, now) for m in queue_commands.list_messages(runtime, domain, unreadable)]
    records += [queue_commands.describe_unreadable(runtime, *found, now=now) for found in unreadable]
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        _print_queue(records)
        _mention_quarantine(runtime, domain, now)
        if not records and domain and domain != OUTBOUND and domain not in runtime.hosted_domains():
            print("odmrd: note: %s is not a hosted domain (%s holds the bounces waiting for "
                  "bounce_relay)" % (domain, OUTBOUND), file=sys.stderr)
    return EX_OK


def _mention_quarantine(runtime, domain: Optional[str], now: float) -> None:
    """Files set aside are mail too: a listing that says "empty" must not hide them
    from an operator about to remove the spool."""
    from odmr import queue_commands
    from odmr.names import plural
    try:
        held = [r for r in queue_commands.quarantined(runtime, now) if domain in (None, r["domain"])]
    except (OSError, ValueError):
        return
    if held:
        print("and %s set aside: odmrd queue list --quarantine"
              % plural(len(held), "quarantined file"))


def _quarantine_list(runtime, domain: Optional[str], as_json: bool, now: float) -> int:
    from odmr import queue_commands
    from odmr.logline import escape_for_log as safe
    from odmr.names import plural
    records = [r for r in queue_commands.quarantined(runtime, now) if domain in (None, r["domain"])]
    if as_json:
        print(json.dumps(records, indent=1))
        return EX_OK
    if not records:
        print("Quarantine is empty")
        return EX_OK
    print("%-22s %-24s %9s %-20s %s" % ("ID", "DOMAIN", "SIZE", "QUARANTINED", "REASON"))
    for r in records:
        print("%-22s %-24s %9d %-20s %s" % (
            r["id"], r["domain"], r["size"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["quarantined"])),
            safe(r["reason"] or "-")))
    print("-- %s; after repairing one: odmrd queue requeue ID" % plural(len(records), "file"))
    return EX_OK


def _queue_requeue(runtime, args) -> int:
    """requeue each ID; the exit code of the last failure (sysexits), 0 when all went back."""
    from odmr import queue_commands
    from odmr.spool import CorruptMessage, LinkRefused, SpoolError, UnreadableMessage
    code = EX_OK
    for msg_id in args.ids:
        try:
            queue = queue_commands.requeue(runtime, msg_id)
        except FileNotFoundError:
            print("odmrd: no quarantined message %s" % msg_id, file=sys.stderr)
            code = EX_NOINPUT
        except LinkRefused:
            print("odmrd: %s: a symbolic link in the quarantine; refused" % msg_id, file=sys.stderr)
            code = EX_DATAERR
        except UnreadableMessage as exc:
            print("odmrd: %s: still unreadable by this account: %s" % (msg_id, exc), file=sys.stderr)
            code = EX_NOPERM if exc.errno in (errno.EACCES, errno.EPERM) else EX_IOERR
        except CorruptMessage as exc:
            print("odmrd: %s: still corrupt: %s" % (msg_id, exc), file=sys.stderr)
            code = EX_DATAERR
        except SpoolError as exc:
            print("odmrd: %s" % exc, file=sys.stderr)
            code = EX_CANTCREAT
        else:
            print("%s: requeued to %s" % (msg_id, queue))
    return code


def _queue_summary(runtime, args) -> int:
    """qshape for odmrd: directory listings and file times only (no message is read)."""
    from odmr import config, qshape
    now = time.time()
    rows = qshape.summary(runtime.spool.root, strict=True, processes=min(4, config.usable_cpus()), now=now)
    if args.json:
        print(json.dumps([row.as_json(now) for row in rows], indent=1))
    else:
        print("\n".join(qshape.format_table(rows, now)))
    return EX_OK


def cmd_status(args: argparse.Namespace, config_path: str) -> int:
    """`odmrd status`: LSB codes (0 running, 3 not running, 4 unknown), one line on failure."""
    from odmr import config, control
    try:
        settings = config.load(config_path)
    except config.ConfigError as exc:
        return _config_failed(exc, config_path)
    try:
        answer = control.query(settings.spool_dir, _daemon_uids(settings))
    except control.ControlError as exc:
        print("odmrd: %s" % exc, file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(answer, indent=1))
    else:
        print("\n".join(control.format_report(answer)))
    return EX_OK


def _daemon_uids(settings) -> List[int]:
    """Who may answer on the control socket: root, us, the service account, the spool's owner."""
    uids = [0, os.geteuid()]
    if settings.user:
        import pwd
        try:
            uids.append(pwd.getpwnam(settings.user).pw_uid)
        except KeyError:
            pass
    try:
        uids.append(os.stat(settings.spool_dir).st_uid)
    except OSError:
        pass
    return uids


def _queue_show(runtime, args) -> int:
    from odmr import queue_commands
    message = runtime.spool.find(args.id)
    if message is None:
        return fail("no message %s" % args.id, EX_NOINPUT)
    print(json.dumps(queue_commands.describe(message), indent=1))
    print()
    sys.stdout.flush()
    with message.open_data() as fh:
        sys.stdout.buffer.write(fh.read())
    sys.stdout.buffer.flush()
    return EX_OK


def _queue_change(runtime, args) -> int:
    """delete or bounce each ID; a pending bounce is never bounced (it would vanish)."""
    from odmr import queue_commands
    deleting = args.queue_command == "delete"
    missing = refused = 0
    for msg_id in args.ids:
        try:
            done = queue_commands.delete(runtime, msg_id) if deleting else queue_commands.bounce(runtime, msg_id)
        except queue_commands.NotBounceable as exc:
            print("odmrd: %s" % exc, file=sys.stderr)
            refused += 1
            continue
        if done:
            print("%s: %s" % (msg_id, "deleted" if deleting else done))
        else:
            print("odmrd: no message %s" % msg_id, file=sys.stderr)
            missing += 1
    return EX_DATAERR if refused else EX_NOINPUT if missing else EX_OK


def _queue_expire(runtime, args) -> int:
    from odmr.names import plural
    from odmr.queuemgr import expire_all
    counts = expire_all(runtime)
    print("%d expired%s" % (counts["expired"], ", %s busy (try again)"
                             % plural(counts["busy"], "domain") if counts["busy"] else ""))
    return EX_TEMPFAIL if counts["busy"] else EX_OK


def _queue_name(text: str) -> str:
    """A DOMAIN argument: a hosted domain in any form, or a name that `queue list` shows in
    its domain column (.outbound, the bounces waiting for bounce_relay)."""
    from odmr.names import normalize_domain
    from odmr.spool import OUTBOUND
    if text.lower() == OUTBOUND:
        return OUTBOUND
    try:
        return normalize_domain(text)
    except ValueError as exc:
        raise UsageError("invalid domain %r: %s (or %s for the bounces waiting for the "
                         "bounce relay)" % (text, exc, OUTBOUND))


def _print_queue(records) -> None:
    """The text listing: every field a peer wrote (addresses, the customer's last reply) is
    escaped, so nothing in the queue can drive the operator's terminal."""
    from odmr.logline import escape_for_log as safe
    from odmr.names import plural
    from odmr.qshape import short_age
    if not records:
        print("Mail queue is empty")
        return
    print("%-22s %-24s %9s %8s  %s" % ("ID", "DOMAIN", "SIZE", "AGE", "SENDER / RECIPIENTS"))
    for r in records:
        age_text = short_age(r["age"])
        if not r["recipients"] and r["last_error"].startswith("unusable: "):
            print("%-22s %-24s %9d %8s  %s" % (r["id"], r["domain"], r["size"], age_text,
                                               safe(r["last_error"])))
            continue
        print("%-22s %-24s %9d %8s  <%s>" % (r["id"], r["domain"], r["size"], age_text,
                                             safe(r["sender"])))
        for rcpt in r["recipients"]:
            print("%66s<%s>" % ("", safe(rcpt)))
        if r["attempts"]:
            print("%66s(%s; last: %s)" % ("", plural(r["attempts"], "attempt"),
                                             safe(r["last_error"] or "-")))
    print("-- %s, %s" % (plural(len(records), "message"),
                         plural(sum(r["size"] for r in records), "byte")))
