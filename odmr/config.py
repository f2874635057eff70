"""Configuration: the only importer of configobj.

The configspec ships inside the package (read with pkgutil so that it also
loads from the zipapp). `load()` validates everything at once and either
returns frozen settings or raises ConfigError listing every problem with its
key and line.
"""
from __future__ import annotations

import dataclasses
import os
import pkgutil
import re
import socket
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
try:
    from configobj.validate import ValidateError, Validator
except ImportError:                     # configobj before 5.0.7 (Ubuntu 22.04) ships it top-level
    from validate import ValidateError, Validator

from odmr.names import address_is_safe, normalize_domain
from odmr.syntax import route_in_address

DEFAULT_CONFIG = "/etc/odmrd/odmrd.conf"
KNOWN_MECHANISMS = ("CRAM-MD5", "SCRAM-SHA-256", "PLAIN", "LOGIN", "EXTERNAL")

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$", re.I)
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)b?\s*$", re.I)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


class ConfigError(Exception):
    """Carries every problem found, one `key (line N): message` string each."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    def lines(self, path: str) -> List[str]:
        """Each problem once, prefixed with the file it is about."""
        full = os.path.abspath(path)
        return [p if p.startswith(path) or p.startswith(full) else "%s: %s" % (path, p)
                for p in self.problems]


# -- converters: tiny pure functions, also used by the command line ---------

def parse_duration(value: str) -> float:
    """'30s', '5m', '4h', '10d' (or bare seconds) -> seconds."""
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError("not a duration (use e.g. 30s, 5m, 4h, 10d): %r" % value)
    return float(int(m.group(1)) * _DURATION_UNITS[m.group(2).lower()])


def parse_size(value: str) -> int:
    """'10K', '50M', '1G' (or bare bytes) -> bytes."""
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError("not a size (use e.g. 10K, 50M, 1G): %r" % value)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_hostport(value: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """'127.0.0.1:3366', '[::1]:3366', 'host:25' -> (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("missing ']' in %r" % value)
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ']' in %r" % value)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError("write IPv6 addresses as [addr]:port: %r" % value)
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError("missing port in %r" % value)
        port = default_port
    else:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError("bad port in %r" % value)
        port = int(port_text)
    if not host:
        raise ValueError("missing host in %r" % value)
    return host, port


def parse_domains(items: Sequence[str]) -> List[str]:
    """Domain names, each item possibly comma-separated -> normalised, without repeats."""
    domains: List[str] = []
    for item in items:
        for name in str(item).split(","):
            try:
                domain = normalize_domain(name.strip())
            except ValueError as exc:
                raise ValueError("%r: %s" % (name, exc)) from None
            if domain not in domains:
                domains.append(domain)
    return domains


def parse_client_mechanism(name: str) -> str:
    """A SASL mechanism `odmrd fetch` can use, any case -> its upper-case name."""
    from odmr.sasl import CLIENT_MECHANISMS
    upper = name.strip().upper()
    if upper not in CLIENT_MECHANISMS:
        raise ValueError("unknown mechanism %s (known: %s)"
                         % (upper, ", ".join(sorted(CLIENT_MECHANISMS))))
    return upper


def _as_list(value) -> List[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if value in (None, ""):
        return []
    return [str(value)]


def _check_duration(value, *args, **kw) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValidateError(str(exc)) from None


def _check_size(value, *args, **kw) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ValidateError(str(exc)) from None


def _check_listen_list(value, *args, **kw) -> List[Tuple[str, int]]:
    result = []
    for item in _as_list(value):
        if not item.strip():
            continue
        try:
            result.append(parse_hostport(item))
        except ValueError as exc:
            raise ValidateError(str(exc)) from None
    return result


def _check_hostport(value, default_port=None, *args, **kw):
    """HOST[:PORT] -> (host, port), or "" when empty; `default_port` when none is given."""
    text = str(value).strip()
    if not text:
        return ""
    try:
        return parse_hostport(text, None if default_port is None else int(default_port))
    except ValueError as exc:
        raise ValidateError(str(exc)) from None


def _check_domain_list(value, *args, **kw) -> List[str]:
    try:
        return parse_domains(_as_list(value))
    except ValueError as exc:
        raise ValidateError("invalid domain %s" % exc) from None


def _check_client_mechanism(value, *args, **kw) -> str:
    if not str(value).strip():
        return ""
    try:
        return parse_client_mechanism(str(value))
    except ValueError as exc:
        raise ValidateError(str(exc)) from None


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(r"%s(?:\.%s)*\.?" % (_LABEL, _LABEL))


def _check_hostname(value, *args, **kw) -> str:
    """The greeting and EHLO name: a domain name (letters, digits, hyphens) or empty."""
    text = str(value).strip()
    if text and (len(text) > 253 or not _HOSTNAME.fullmatch(text)):
        raise ValidateError("not a host name (letters, digits, '-' and '.'): %r" % text)
    return text


def _check_relay(value, *args, **kw) -> str:
    """host[:port] of the bounce relay (port 25 when left out), or empty."""
    text = str(value).strip()
    if text:
        try:
            host, port = parse_hostport(text, 25)
        except ValueError as exc:
            raise ValidateError(str(exc)) from None
        if port == 0:
            raise ValidateError("bad port in %r" % text)
    return text


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cpusets), not all the host has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):       # not on every platform
        return os.cpu_count() or 1


def _check_workers(value, *args, **kw) -> int:
    """`auto` (four per usable CPU, at most 16: most sessions get a process of their own, so no
    GIL hand-overs; each costs ~5 MB of private memory) or a count of intake worker
    processes; 1 keeps sessions in the main process."""
    text = str(value).strip().lower()
    if text == "auto":
        return max(2, min(16, 4 * usable_cpus()))
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise ValidateError("expected auto or a number from 1 to 64, not %r" % str(value))
    return int(text)


def _check_mailbox(value, *args, **kw) -> str:
    """local@domain with a valid domain, or empty."""
    text = str(value).strip()
    if text:
        local, at, domain = text.rpartition("@")
        if not at or not local or not address_is_safe(text) or " " in text:
            raise ValidateError("not an address (local@domain): %r" % text)
        try:
            normalize_domain(domain)
        except ValueError:
            raise ValidateError("not an address (local@domain): %r" % text) from None
        routed = route_in_address(text)     # refused at RCPT: the address would be unreachable
        if routed:
            raise ValidateError("%r carries a route (%s)" % (text, routed))
    return text


def _check_mechanism_list(value, *args, **kw) -> List[str]:
    result = []
    for item in _as_list(value):
        name = item.strip().upper()
        if not name:
            continue
        if name not in KNOWN_MECHANISMS:
            raise ValidateError("unknown SASL mechanism %r" % item)
        result.append(name)
    return result


def _recipient_entries(value) -> Tuple[str, ...]:
    """A [domains] recipients list: local parts, and addresses whose domain is
    normalised like every other (so info@straße.de matches mail to xn--strae-oqa.de)."""
    entries = []
    for item in _as_list(value):
        item = item.strip()
        if "@" in item:
            local, _, domain = item.rpartition("@")
            try:
                item = "%s@%s" % (local, normalize_domain(domain))
            except ValueError as exc:
                raise ValueError("not an address (local@domain): %r: %s" % (item, exc)) from None
        if item:
            entries.append(item)
    return tuple(entries) or ("*",)


# -- settings objects ------------------------------------------------------

@dataclass(frozen=True)
class DomainPolicy:
    max_bytes: int = 0            # 0 = unlimited
    max_messages: int = 0
    recipients: Tuple[str, ...] = ("*",)

    def accepts(self, local: str, domain: str) -> bool:
        """Whether this domain takes mail for local@domain (case-insensitive)."""
        if "*" in self.recipients:
            return True
        address = ("%s@%s" % (local, domain)).lower()
        for entry in self.recipients:
            entry = entry.lower()
            if entry == local.lower() or entry == address:
                return True
        return False


NO_POLICY = DomainPolicy()      # a domain without a [domains] section: no limits


@dataclass(frozen=True)
class OdmrSettings:
    listen: Tuple[Tuple[str, int], ...]
    tls_listen: Tuple[Tuple[str, int], ...]
    mechanisms: Tuple[str, ...]
    allow_plaintext_passwords: bool
    require_tls: bool
    max_sessions: int
    max_sessions_per_address: int
    idle_timeout: float
    max_bad_commands: int
    max_auth_failures: int
    auth_throttle_failures: int
    auth_throttle_window: float
    one_line_per_tls_record: bool
    proxy_protocol: bool
    proxy_trusted: Tuple[str, ...]
    delivery_window: int = 1        # messages in flight after the turnaround (SPEC §3, §4)


@dataclass(frozen=True)
class SmtpSettings:
    listen: Tuple[Tuple[str, int], ...]
    tls_listen: Tuple[Tuple[str, int], ...]
    max_message_size: int
    max_recipients: int
    require_tls: bool
    max_sessions: int
    max_sessions_per_address: int
    idle_timeout: float
    max_bad_commands: int
    allow_routing_local_parts: bool = False     # user%host@, host!user@, "a@b"@ ... (SPEC §5)
    postmaster: str = ""            # where RCPT TO:<postmaster> (no domain) goes
    max_data_time: float = 1800.0   # a DATA phase that lasts longer is ended with 451
    max_received_headers: int = 30  # more Received: fields: 554 5.4.6 (a mail loop)
    workers: int = 1                # intake processes (`auto`: four per CPU); 1: sessions in the main process
    proxy_protocol: bool = False    # behind a load balancer: a PROXY header starts each connection
    proxy_trusted: Tuple[str, ...] = ("127.0.0.1",)


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str
    key_file: str
    client_ca_file: str


@dataclass(frozen=True)
class QueueSettings:
    max_age: float
    warn_after: float
    bounce_relay: str


@dataclass(frozen=True)
class MetricsSettings:
    listen: Optional[Tuple[str, int]] = None    # the Prometheus endpoint; None: off
    per_domain: bool = False                    # queue gauges per domain (cardinality!)


@dataclass(frozen=True)
class Settings:
    path: str
    hostname: str
    spool_dir: str
    users_file: str
    pid_file: str
    user: str
    log_level: str
    syslog: str
    log_file: str
    allow_root: bool
    grace_period: float
    odmr: OdmrSettings
    smtp: SmtpSettings
    tls: TlsSettings
    queue: QueueSettings
    domains: Dict[str, DomainPolicy] = field(default_factory=dict)
    fetch: Dict[str, object] = field(default_factory=dict)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def policy(self, domain: str) -> DomainPolicy:
        return self.domains.get(domain) or NO_POLICY


# -- loading ---------------------------------------------------------------

def default_config_path() -> str:
    return os.environ.get("ODMRD_CONFIG") or DEFAULT_CONFIG


def _configspec() -> List[str]:
    data = pkgutil.get_data("odmr", "configspec.ini")
    if data is None:  # pragma: no cover - only a broken build gets here
        raise ConfigError(["configspec.ini is missing from the odmr package"])
    return data.decode("utf-8").splitlines()


def line_numbers(path: str) -> Dict[Tuple[Tuple[str, ...], str], int]:
    """Map (section path, key) -> line number, for error messages."""
    numbers: Dict[Tuple[Tuple[str, ...], str], int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return numbers
    stack: List[str] = []
    header = re.compile(r"^\s*(\[+)\s*([^\]]*?)\s*(\]+)\s*(#.*)?$")
    keyline = re.compile(r"^\s*([^#=\s][^=]*?)\s*=")
    for number, line in enumerate(lines, 1):
        m = header.match(line)
        if m:
            depth = len(m.group(1))
            stack = stack[: depth - 1] + [m.group(2).strip("\"'")]
            numbers.setdefault((tuple(stack), ""), number)
            continue
        m = keyline.match(line)
        if m:
            numbers.setdefault((tuple(stack), m.group(1).strip("\"'")), number)
    return numbers


def _where(lines, sections, key) -> str:
    name = ".".join(list(sections) + ([key] if key else []))
    number = lines.get((tuple(sections), key or ""))
    if number is None and key:              # the key names a section: its header's line
        number = lines.get((tuple(sections) + (key,), ""))
    if number is None and key:
        number = lines.get((tuple(sections), ""))
    return "%s (line %d)" % (name, number) if number else name


def _resolve(base: str, path: str) -> str:
    if not path:
        return path
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def default_hostname() -> str:
    try:
        return socket.getfqdn() or "localhost"
    except OSError:
        return "localhost"


def load(path: Optional[str] = None) -> Settings:
    """Read and validate the configuration file; raise ConfigError on any problem."""
    path = os.path.abspath(path or default_config_path())
    raw = _read(path)
    result = raw.validate(_validator(), preserve_errors=True)
    lines = line_numbers(path)
    problems = _validation_problems(raw, result, lines) + _unknown_names(raw, lines)
    domains, domain_problems = _domain_policies(raw, result, lines)
    problems += domain_problems + _listener_problems(raw, lines)
    if problems:
        raise ConfigError(problems)
    return _settings(path, raw, domains)


def _read(path: str) -> ConfigObj:
    """The file parsed, not yet validated; syntax errors with their line numbers."""
    if not os.path.exists(path):
        raise ConfigError(["%s: no such configuration file" % path])
    try:
        return ConfigObj(path, configspec=_configspec(), encoding="utf-8",
                         file_error=True, raise_errors=False, list_values=True)
    except ConfigObjError as exc:
        problems = []
        for err in getattr(exc, "errors", []) or [exc]:
            number = getattr(err, "line_number", None)
            message = re.sub(r"\s+at line \d+\.?$", "", str(getattr(err, "message", err)))
            text = str(getattr(err, "line", "") or "").strip()
            problems.append("%s: line %s: %s%s" % (path, number, message[:1].lower() + message[1:],
                                                   ": %s" % text[:80] if text else ""))
        raise ConfigError(problems) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(["%s: %s (running as uid %d)" % (path, reason, os.geteuid())]) from None


def _validator() -> Validator:
    """The configspec's own types, each a converter from the section above."""
    return Validator({
        "duration": _check_duration,
        "size": _check_size,
        "listen_list": _check_listen_list,
        "mechanism_list": _check_mechanism_list,
        "hostname": _check_hostname,
        "relay": _check_relay,
        "mailbox": _check_mailbox,
        "workers": _check_workers,
        "hostport": _check_hostport,
        "domain_list": _check_domain_list,
        "client_mechanism": _check_client_mechanism,
    })


def _validation_problems(raw: ConfigObj, result, lines) -> List[str]:
    if result is True:
        return []
    problems = []
    for sections, key, error in flatten_errors(raw, result):
        if key is None:
            problems.append("%s: missing section" % _where(lines, sections, ""))
        elif error is False:
            problems.append("%s: missing value" % _where(lines, sections, key))
        else:
            message = str(error) if isinstance(error, ValidateError) else "invalid value"
            problems.append("%s: %s" % (_where(lines, sections, key), message))
    return problems


def _unknown_names(raw: ConfigObj, lines) -> List[str]:
    problems = []
    for sections, name in get_extra_values(raw):
        container = raw
        for section in sections:
            container = container[section]
        kind = "section" if isinstance(container.get(name), dict) else "key"
        problems.append("%s: unknown %s" % (_where(lines, sections, name), kind))
    return problems


def _domain_policies(raw: ConfigObj, result, lines) -> Tuple[Dict[str, DomainPolicy], List[str]]:
    """[domains] by normalised name; a section whose values failed is left out
    (its errors are reported already)."""
    domains: Dict[str, DomainPolicy] = {}
    problems: List[str] = []
    for name in list(raw.get("domains", {}).keys()):
        section = raw["domains"][name]
        try:
            domain = normalize_domain(name)
        except ValueError as exc:
            problems.append("%s: invalid domain name: %s" % (_where(lines, ("domains",), name), exc))
            continue
        if domain in domains:
            problems.append("%s: the same domain (%s) has a section already"
                            % (_where(lines, ("domains",), name), domain))
            continue
        if isinstance(section, dict) and result is not True and not _section_ok(result, "domains", name):
            continue
        try:
            recipients = _recipient_entries(section["recipients"])
        except ValueError as exc:
            problems.append("%s: %s" % (_where(lines, ("domains", name), "recipients"), exc))
            continue
        domains[domain] = DomainPolicy(
            max_bytes=int(section["max_bytes"]),
            max_messages=int(section["max_messages"]),
            recipients=recipients,
        )
    return domains, problems


def _listener_problems(raw: ConfigObj, lines) -> List[str]:
    odmr = raw.get("odmr")
    if odmr and isinstance(odmr.get("listen"), list) and not odmr["listen"] \
            and not odmr.get("tls_listen"):
        return ["%s: no ODMR listener configured" % _where(lines, ("odmr",), "listen")]
    return []


def _settings(path: str, raw: ConfigObj, domains: Dict[str, DomainPolicy]) -> Settings:
    """The validated file as frozen settings; relative paths from the file's directory."""
    base = os.path.dirname(path)
    tls = raw["tls"]
    return Settings(
        path=path,
        hostname=raw["hostname"] or default_hostname(),
        spool_dir=_resolve(base, raw["spool_dir"]),
        users_file=_resolve(base, raw["users_file"]),
        pid_file=_resolve(base, raw["pid_file"]),
        user=raw["user"],
        log_level=raw["log_level"],
        syslog=raw["syslog"],
        log_file=_resolve(base, raw["log_file"]),
        allow_root=raw["allow_root"],
        grace_period=raw["grace_period"],
        odmr=_section_settings(OdmrSettings, raw["odmr"]),
        smtp=_section_settings(SmtpSettings, raw["smtp"]),
        tls=TlsSettings(
            cert_file=_resolve(base, tls["cert_file"]),
            key_file=_resolve(base, tls["key_file"]),
            client_ca_file=_resolve(base, tls["client_ca_file"]),
        ),
        queue=QueueSettings(
            max_age=raw["queue"]["max_age"],
            warn_after=raw["queue"]["warn_after"],
            bounce_relay=raw["queue"]["bounce_relay"],
        ),
        domains=domains,
        fetch=dict(raw["fetch"]),
        metrics=MetricsSettings(listen=raw["metrics"]["listen"] or None,
                                per_domain=raw["metrics"]["per_domain"]),
    )


def _section_settings(cls, section):
    """A settings dataclass from its validated section: one field per key of the same
    name (the configspec names them), lists frozen into tuples."""
    return cls(**{f.name: tuple(section[f.name]) if isinstance(section[f.name], list)
                  else section[f.name] for f in dataclasses.fields(cls)})


_LENIENT = {"pid_file": ("odmrd.pid", "path"), "user": ("", "text"),
            "grace_period": ("30s", "duration"), "spool_dir": ("spool", "path"),
            "users_file": ("users", "path")}


def lenient_value(path: str, key: str) -> Union[str, float, None]:
    """One top-level setting read from a file that fails validation elsewhere,
    or None when that setting itself is unusable."""
    if key not in _LENIENT:
        return None
    default, kind = _LENIENT[key]
    path = os.path.abspath(path)
    try:
        raw = ConfigObj(path, encoding="utf-8", file_error=True, list_values=False)
    except (ConfigObjError, OSError, UnicodeDecodeError):
        return None
    value = raw.get(key, default)
    if not isinstance(value, str):
        return None
    try:
        if kind == "duration":
            return parse_duration(value)
        if kind == "path":
            return _resolve(os.path.dirname(path), value)
    except ValueError:
        return None
    return value


def _section_ok(result, *names) -> bool:
    node = result
    for name in names:
        if node is True:
            return True
        if not isinstance(node, dict):
            return False
        node = node.get(name, True)
    if node is True:
        return True
    if isinstance(node, dict):
        return all(v is True for v in node.values())
    return False
