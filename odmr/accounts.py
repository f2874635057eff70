"""The users file: customer accounts, the domains each may collect, credentials.

Format (configobj, one section per account, mode 0600):

    [alice]
    domains = example.org, example.com
    scram_sha_256 = SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>
    cram_md5 = hex:<password in hex>      # absent with --no-cram-md5
    shared_domains = example.com          # optional: see below

The SCRAM keys cannot be turned back into the password; the CRAM-MD5 secret
can (the mechanism needs the shared secret itself), which is why it may be
left out.

A domain has one owner: two accounts listing it could each ATRN the other's
mail. A file that gives one domain to several accounts is refused unless each
of them lists it in `shared_domains` too (`user add --shared-domain` does so).
Domains are compared in their IDNA 2008 A-label form, so `straße.de` and
`xn--strae-oqa.de` are one domain.
"""
from __future__ import annotations

import binascii
import errno
import fcntl
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from configobj import ConfigObj, ConfigObjError

from odmr.config import line_numbers
from odmr.durable import fsync_dir
from odmr.names import normalize_domain
from odmr.sasl import MIN_SCRAM_ITERATIONS, ScramSecret

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
_KEYS = {"domains", "shared_domains", "scram_sha_256", "cram_md5", "client_cert"}


class AccountsError(Exception):
    """The users file cannot be used; the message says why, one line per problem."""


class SecretNotCreated(AccountsError):
    """The decoy secret is missing and could not be made (e.g. a read-only directory)."""


@dataclass(frozen=True)
class Account:
    name: str
    domains: Tuple[str, ...]
    scram: Optional[ScramSecret]
    cram_md5_secret: Optional[str]
    client_cert: str = ""          # certificate subject CN for SASL EXTERNAL
    shared_domains: Tuple[str, ...] = ()     # domains other accounts may own too, on purpose

    def verify_password(self, password: str) -> bool:
        return bool(self.scram and self.scram.verify_password(password))


def valid_account_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name or ""))


def _encode_cram(secret: str) -> str:
    return "hex:" + secret.encode("utf-8").hex()


def _decode_cram(text: str) -> str:
    if not text.startswith("hex:"):
        raise ValueError("cram_md5 must start with 'hex:'")
    return binascii.unhexlify(text[4:]).decode("utf-8")


def _domains(value) -> List[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [i.strip() for i in items if str(i).strip()]


class Accounts:
    """An immutable snapshot of the users file, swapped wholesale on reload."""

    def __init__(self, accounts: Iterable[Account] = (), path: str = ""):
        self.path = path
        self._by_name: Dict[str, Account] = {a.name: a for a in accounts}
        owners: Dict[str, List[str]] = {}
        for account in self._by_name.values():
            for domain in account.domains:
                owners.setdefault(domain, []).append(account.name)
        self._owners = owners
        self._by_cert = {a.client_cert: a for a in self._by_name.values() if a.client_cert}

    def get(self, name: str) -> Optional[Account]:
        return self._by_name.get(name)

    def by_client_cert(self, subject: str) -> Optional[Account]:
        return self._by_cert.get(subject)

    def __iter__(self):
        return iter(sorted(self._by_name.values(), key=lambda a: a.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def hosted_domains(self) -> frozenset:
        return frozenset(self._owners)

    def owners(self, domain: str) -> Tuple[str, ...]:
        """The accounts that may collect a (normalised) domain's mail."""
        return tuple(self._owners.get(domain, ()))


def check_permissions(path: str) -> None:
    """Refuse a users file that group or others can read or write."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise AccountsError("%s: %s" % (path, exc.strerror)) from None
    if st.st_mode & 0o077:
        raise AccountsError("%s: mode %04o is too open; run: chmod 600 %s"
                            % (path, stat.S_IMODE(st.st_mode), path))


def load(path: str, check_mode: bool = True) -> Accounts:
    """Parse and check the users file; AccountsError lists every problem."""
    if not os.path.exists(path):
        raise AccountsError("%s: no such users file (create it with 'odmrd user add')" % path)
    if check_mode:
        check_permissions(path)
    raw = _read(path)
    numbers = line_numbers(path)
    problems: List[str] = []
    accounts = []
    for name in raw.sections:
        where = "%s: [%s]%s" % (path, name, _line(numbers, (name,)))
        if not valid_account_name(name):
            problems.append("%s: invalid account name" % where)
            continue
        accounts.append(_account(name, raw[name], where, numbers, problems))
    for key in raw.scalars:
        problems.append("%s: %s%s: values must be inside an [account] section"
                        % (path, key, _line(numbers, (), key)))
    problems.extend(_ownership_problems(path, accounts))
    if problems:
        raise AccountsError("\n".join(problems))
    return Accounts(accounts, path)


_LineNumbers = Dict[Tuple[Tuple[str, ...], str], int]


def _line(numbers: _LineNumbers, section: Tuple[str, ...], key: str = "") -> str:
    """" (line N)" for an error message, when the line is known."""
    number = numbers.get((section, key))
    return " (line %d)" % number if number else ""


def _account(name: str, section, where: str, numbers: _LineNumbers, problems: List[str]) -> Account:
    """One [account] section; what is wrong with it goes to `problems` (the account is
    still returned, so that every problem of the file is listed at once)."""
    for key in section.keys():
        if key not in _KEYS:
            problems.append("%s: unknown key %s%s" % (where, key, _line(numbers, (name,), key)))
    for sub in section.sections:
        problems.append("%s: unexpected subsection %s" % (where, sub))
    domains = _normalized_list(section, "domains", where, problems)
    if not domains:
        problems.append("%s: domains: at least one domain is needed" % where)
    shared = _normalized_list(section, "shared_domains", where, problems)
    for domain in shared:
        if domain not in domains:
            problems.append("%s: shared_domains: %s is not one of the account's domains"
                            % (where, domain))
    scram = None
    if section.get("scram_sha_256"):
        try:
            scram = ScramSecret.from_string(section["scram_sha_256"])
        except ValueError:
            problems.append("%s: scram_sha_256: malformed" % where)
        else:
            if scram.iterations < MIN_SCRAM_ITERATIONS:
                # RFC 7677's minimum, which `odmrd fetch` insists on: a key it refuses is no key
                problems.append("%s: scram_sha_256: %d iterations, fewer than RFC 7677's %d; set "
                                "the password again with 'odmrd user passwd'"
                                % (where, scram.iterations, MIN_SCRAM_ITERATIONS))
    cram = None
    if section.get("cram_md5"):
        try:
            cram = _decode_cram(section["cram_md5"])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            problems.append("%s: cram_md5: malformed" % where)
    if scram is None and cram is None and not section.get("client_cert"):
        problems.append("%s: no credentials" % where)
    return Account(name, tuple(dict.fromkeys(domains)), scram, cram,
                   str(section.get("client_cert", "")), tuple(dict.fromkeys(shared)))


def _normalized_list(section, key: str, where: str, problems: List[str]) -> List[str]:
    """A list of domains from the users file in A-label form; bad names go to `problems`."""
    names = []
    for item in _domains(section.get(key, [])):
        try:
            names.append(normalize_domain(item))
        except ValueError as exc:
            problems.append("%s: %s: %r: %s" % (where, key, item, exc))
    return names


def _ownership_problems(path: str, accounts: List[Account]) -> List[str]:
    """A domain with several owners is an error unless every owner shares it on purpose."""
    owners: Dict[str, List[Account]] = {}
    for account in accounts:
        for domain in account.domains:
            owners.setdefault(domain, []).append(account)
    problems = []
    for domain, holders in sorted(owners.items()):
        if len(holders) > 1 and not all(domain in a.shared_domains for a in holders):
            problems.append("%s: domain %s belongs to accounts %s: a domain has one owner "
                            "(remove it from all but one, or list it in shared_domains of "
                            "each to share it on purpose)"
                            % (path, domain, ", ".join(a.name for a in holders)))
    return problems


def owner_warning(path: str, allowed_uids: Iterable[int]) -> Optional[str]:
    """Whoever owns the users file can rewrite every account's domains and secrets."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid in set(allowed_uids):
        return None
    try:
        import pwd
        owner = "%s (uid %d)" % (pwd.getpwuid(st.st_uid).pw_name, st.st_uid)
    except (KeyError, ImportError):
        owner = "uid %d" % st.st_uid
    return ("%s is owned by %s, not by the service account or root: that account can change "
            "every customer's domains and credentials" % (path, owner))


def _read(path: str) -> ConfigObj:
    try:
        return ConfigObj(path, encoding="utf-8", file_error=True, list_values=True)
    except ConfigObjError as exc:
        lines = ["%s: line %s: %s" % (path, getattr(e, "line_number", "?"), getattr(e, "message", e))
                 for e in (getattr(exc, "errors", None) or [exc])]
        raise AccountsError("\n".join(lines)) from None
    except OSError as exc:
        raise AccountsError("%s: %s%s" % (path, exc.strerror or exc, _as_whom(exc))) from None
    except UnicodeDecodeError as exc:
        raise AccountsError("%s: not UTF-8 (%s)" % (path, exc.reason)) from None


def _as_whom(exc: OSError) -> str:
    """Who was refused: a command run as the wrong account is the usual cause."""
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    import pwd
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = "uid %d" % os.geteuid()
    return " (running as %s; the users file belongs to the service account)" % name


# -- editing (used by `odmrd user ...`) -------------------------------------

class _Editor:
    """Holds an exclusive lock on the users file while it is rewritten."""

    def __init__(self, path: str, create: bool, new_file_owner: Optional[Tuple[int, int]] = None):
        self.path = path
        self.create = create
        self.new_file_owner = new_file_owner        # (uid, gid) of a file root creates

    def __enter__(self) -> ConfigObj:
        directory = os.path.dirname(os.path.abspath(self.path)) or "."
        lock_path = os.path.join(directory, "." + os.path.basename(self.path) + ".lock")
        try:
            # never through a link planted where the lock belongs: root would chmod its target
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AccountsError("%s is a symbolic link; refusing to use it as the users "
                                    "file's lock (remove it)" % lock_path) from None
            raise
        self._lock = os.fdopen(fd, "a")
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.exists(self.path):
            self.config = _read(self.path)
        elif self.create:
            self.config = ConfigObj(encoding="utf-8")
        else:
            raise AccountsError("%s: no such users file" % self.path)
        return self.config

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                _write_atomically(self.path, self.config, self.new_file_owner)
                if not os.path.lexists(secret_path(self.path)):
                    decoy_secret(self.path)     # made once; serve and check-config judge it
        finally:
            self._lock.close()


def _owner_for(path: str, new_file_owner: Optional[Tuple[int, int]] = None) -> Optional[Tuple[int, int]]:
    """Root rewriting the file keeps its owner, so the service account can still read it;
    a file root creates gets `new_file_owner` (the configured service account)."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return new_file_owner
    return st.st_uid, st.st_gid


def _write_atomically(path: str, config: ConfigObj,
                      new_file_owner: Optional[Tuple[int, int]] = None) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    owner = _owner_for(path, new_file_owner)
    fd, tmp = tempfile.mkstemp(prefix=".users.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            fh.write(b"# odmrd users file: edit with 'odmrd user ...'. Keep it mode 0600.\n")
            config.initial_comment = []
            config.filename = None
            for line in config.write():
                fh.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def _credentials(password: str, cram: bool) -> Dict[str, str]:
    creds = {"scram_sha_256": ScramSecret.from_password(password).to_string()}
    if cram:
        creds["cram_md5"] = _encode_cram(password)
    return creds


def add_user(path: str, name: str, domains: Iterable[str], password: str, cram: bool = True,
             shared: bool = False, service_owner: Optional[Tuple[int, int]] = None) -> List[str]:
    """Create an account; returns its domains in A-label form. A domain that already
    has an owner is refused unless `shared`: then it is marked in `shared_domains` of
    every account that holds it. `service_owner`: (uid, gid) that a users file root
    creates here is given to, so the service account can read it."""
    if not valid_account_name(name):
        raise AccountsError("invalid account name %r (letters, digits, . _ @ + -)" % name)
    normalized = []
    for domain in domains:
        try:
            normalized.append(normalize_domain(domain.strip()))
        except ValueError as exc:
            raise AccountsError("invalid domain %r: %s" % (domain, exc)) from None
    if not normalized:
        raise AccountsError("at least one --domain is needed")
    normalized = list(dict.fromkeys(normalized))
    with _Editor(path, create=True, new_file_owner=service_owner) as config:
        if name in config:
            raise AccountsError("account %s already exists" % name)
        owners = _owners_in(config)
        taken = [d for d in normalized if d in owners]
        if taken and not shared:
            domain = taken[0]
            raise AccountsError("domain %s already belongs to account %s: a domain has one owner "
                                "(--shared-domain gives it to both on purpose)"
                                % (domain, ", ".join(owners[domain])))
        for domain in taken:
            for owner in owners[domain]:
                _mark_shared(config[owner], domain)
        config[name] = {"domains": normalized}
        if taken:
            config[name]["shared_domains"] = taken
        config[name].update(_credentials(password, cram))
    return normalized


def _owners_in(config: ConfigObj) -> Dict[str, List[str]]:
    """Domain (A-label) -> the accounts of a users file being edited that list it."""
    owners: Dict[str, List[str]] = {}
    for account in config.sections:
        for item in _domains(config[account].get("domains", [])):
            try:
                holders = owners.setdefault(normalize_domain(item), [])
            except ValueError:
                continue                # `check-config` reports it; it names no domain to share
            if account not in holders:
                holders.append(account)
    return owners


def _mark_shared(section, domain: str) -> None:
    listed = _domains(section.get("shared_domains", []))
    if domain not in [_or_itself(item) for item in listed]:
        section["shared_domains"] = listed + [domain]


def _or_itself(name: str) -> str:
    try:
        return normalize_domain(name)
    except ValueError:
        return name


def set_password(path: str, name: str, password: str, cram: Optional[bool] = None) -> None:
    with _Editor(path, create=False) as config:
        if name not in config:
            raise AccountsError("no account %s" % name)
        keep_cram = ("cram_md5" in config[name]) if cram is None else cram
        config[name].pop("cram_md5", None)
        config[name].update(_credentials(password, keep_cram))


def delete_user(path: str, name: str) -> None:
    with _Editor(path, create=False) as config:
        if name not in config:
            raise AccountsError("no account %s" % name)
        del config[name]


# -- the decoy secret (a file beside the users file) --------------------------
#
# `<users file>.secret` holds the key from which the stand-in SCRAM salts of
# unknown names are derived (sasl.Decoys). It must be the same for every node
# sharing the users file and survive restarts, so it is written once, never
# changed, and each node reads back whatever the first writer put there.

SECRET_SUFFIX = ".secret"
_SECRET_BYTES = 32
_SECRET_HEADER = (b"# odmrd: key for the SCRAM salts shown to unknown user names.\n"
                  b"# Keep it mode 0600, identical on every node sharing the users file.\n")


def secret_path(users_path: str) -> str:
    return users_path + SECRET_SUFFIX


def decoy_secret(users_path: str, create: bool = True) -> Optional[bytes]:
    """The key beside the users file; made (once, by whoever comes first) if missing.

    None when it is missing and `create` is False. AccountsError when it is
    unsafe (a link, readable by others) or malformed; SecretNotCreated when
    it cannot be made."""
    path = secret_path(users_path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        if not create:
            return None
    try:
        _create_secret(path, _owner_for(users_path))
        return _read_secret(path)
    except OSError as exc:
        raise SecretNotCreated("%s: cannot create: %s" % (path, exc.strerror or exc)) from None


def _read_secret(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AccountsError("%s: is a symbolic link; refused" % path) from None
        raise AccountsError("%s: %s" % (path, exc.strerror)) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AccountsError("%s: not a regular file" % path)
        if st.st_mode & 0o077:
            raise AccountsError("%s: mode %04o is too open; run: chmod 600 %s"
                                % (path, stat.S_IMODE(st.st_mode), path))
        data = fh.read(4096)
    lines = [line.strip() for line in data.splitlines()
             if line.strip() and not line.startswith(b"#")]
    try:
        if len(lines) != 1 or len(lines[0]) != 2 * _SECRET_BYTES:
            raise ValueError
        return binascii.unhexlify(lines[0])
    except (ValueError, binascii.Error):
        raise AccountsError("%s: malformed (one line of %d hex digits expected)"
                            % (path, 2 * _SECRET_BYTES)) from None


def _create_secret(path: str, owner: Optional[Tuple[int, int]]) -> None:
    """Write a fresh key to a temporary file, then link it into place.

    link() fails if the name exists, also over NFS, so of two nodes racing
    here exactly one key wins, complete, and both read that one back."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            fh.write(_SECRET_HEADER + secrets.token_bytes(_SECRET_BYTES).hex().encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        fsync_dir(directory)
    finally:
        os.unlink(tmp)
