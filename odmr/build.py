"""`python3 -m odmr.build [--output PATH]`: the single-file build, dist/odmrd.pyz.

The zipapp holds the odmr package (with configspec.ini), configobj (its
package and the top-level `validate` shim) and idna (IDNA 2008), so a bare
`python3 -I -S odmrd.pyz` runs with nothing installed. Both come from this
interpreter's installation, or from `pip install --target` into a temporary
directory when one is not installed (or with --fetch). Beside each source goes
its byte code for the building interpreter (unchecked-hash .pyc, compiled in a
fresh process): a zipapp cannot cache what it compiles, and without it every
command (`odmrd status`, `queue list`) compiled the whole package again, 0.2 s
of a small server's CPU. Another Python version finds the magic number wrong
and compiles the source, as before. Entries are sorted and time-stamped from
SOURCE_DATE_EPOCH or the newest odmr source file, so rebuilding unchanged
sources with the same interpreter, configobj and idna gives identical bytes.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Dict, List, Optional, Tuple

from odmr.exits import EX_CANTCREAT, EX_OK, EX_UNAVAILABLE, EX_USAGE

SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = b'''"""odmrd single-file build: runs odmr.__main__."""
import runpy

runpy.run_module("odmr", run_name="__main__", alter_sys=True)
'''
REQUIREMENTS = ("configobj>=5.0.7", "idna>=3.0")   # what pip fetches when one is missing


class BuildError(Exception):
    """The build cannot go on; one line for the user."""


SUFFIXES = (".py", ".ini")             # sources and data; never byte code or editor debris


def _skip(name: str) -> bool:
    return name == "__pycache__" or name.startswith(".")


def _tree(top: str, prefix: str) -> Dict[str, str]:
    """archive name -> file path for a package directory, without byte code."""
    files: Dict[str, str] = {}
    for directory, subdirs, names in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not _skip(d))
        for name in sorted(names):
            if _skip(name) or not name.endswith(SUFFIXES):
                continue
            path = os.path.join(directory, name)
            files[prefix + "/" + os.path.relpath(path, top).replace(os.sep, "/")] = path
    return files


def _module_files(name: str, search: Optional[List[str]]) -> Optional[Dict[str, str]]:
    """The files of top-level module `name` found on `search` (None: sys.path)."""
    if search is None:
        spec = importlib.util.find_spec(name)
    else:
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name, search)
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    if spec.submodule_search_locations:
        return _tree(list(spec.submodule_search_locations)[0], name)
    if spec.origin.endswith(".py"):
        return {name + ".py": spec.origin}
    return None


def _license_of(project: str, search: Optional[List[str]]) -> Optional[str]:
    """A bundled project's licence file (the BSD licences ask for it to travel with copies)."""
    dirs = search if search is not None else [p for p in sys.path if os.path.isdir(p)]
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.lower().startswith(project + "-") and name.endswith((".dist-info", ".egg-info")):
                for candidate in ("LICENSE", "LICENSE.txt", "LICENSE.md", "licenses/LICENSE",
                                  "licenses/LICENSE.md"):
                    path = os.path.join(directory, name, candidate)
                    if os.path.isfile(path):
                        return path
    return None


def _fetch_dependencies(workdir: str) -> str:
    """pip install configobj and idna into `workdir` (no byte code); returns that directory."""
    target = os.path.join(workdir, "site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-compile", "--no-deps", "--target", target] + list(REQUIREMENTS)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError("cannot run pip to fetch configobj and idna: %s" % exc) from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise BuildError("pip could not fetch configobj and idna: %s" % last)
    return target


def byte_code(files: Dict[str, str], workdir: str) -> Dict[str, str]:
    """archive name -> path of the .pyc for each .py of `files`, compiled by this interpreter
    in a process of its own (marshal's output depends on what else a process holds)."""
    sources = os.path.join(workdir, "byte-code")
    for name, path in files.items():
        if name.endswith(".py"):
            os.makedirs(os.path.dirname(os.path.join(sources, name)), exist_ok=True)
            shutil.copyfile(path, os.path.join(sources, name))
    command = [sys.executable, "-I", "-m", "compileall", "-q", "-b", "-d", "odmrd.pyz",   # not the temp path
               "--invalidation-mode", "unchecked-hash", sources]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError("cannot compile the sources: %s" % exc) from None
    if result.returncode != 0:
        last = ((result.stdout + result.stderr).strip().splitlines() or ["compileall failed"])[-1]
        raise BuildError("cannot compile the sources: %s" % last)
    return {name[:-3] + ".pyc": os.path.join(sources, name[:-3] + ".pyc")
            for name in files if name.endswith(".py")}


def collect(source_root: str, fetch: bool = False) -> Tuple[Dict[str, str], Optional[str]]:
    """Everything that goes into the archive: (archive name -> path, temp dir to remove)."""
    package = os.path.join(source_root, "odmr")
    if not os.path.isfile(os.path.join(package, "configspec.ini")):
        raise BuildError("%s is not an odmr source tree (no odmr/configspec.ini)" % source_root)
    files = _tree(package, "odmr")
    tempdir = None
    search: Optional[List[str]] = None
    if fetch or any(importlib.util.find_spec(name) is None for name in ("configobj", "idna")):
        tempdir = tempfile.mkdtemp(prefix="odmrd-build.")
        search = [_fetch_dependencies(tempdir)]
    found = _module_files("configobj", search)
    if found is None:
        raise BuildError("configobj is not installed and could not be fetched")
    if not any(name.startswith("configobj/validate") for name in found):
        raise BuildError("configobj %s is too old: odmrd needs configobj >= 5.0.7 "
                         "(configobj.validate)" % found.get("configobj.py", ""))
    files.update(found)
    shim = _module_files("validate", search)
    if shim:
        files.update(shim)
    idna = _module_files("idna", search)
    if idna is None or "idna/core.py" not in idna:
        raise BuildError("idna (IDNA 2008) is not installed and could not be fetched")
    files.update(idna)
    for project in ("configobj", "idna"):
        licence = _license_of(project, search)
        if licence:
            files["licenses/%s.txt" % project] = licence
    return files, tempdir


def _source_date(files: Dict[str, str]) -> float:
    """SOURCE_DATE_EPOCH if set (reproducible-builds.org), else the newest odmr source file."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isdigit():
        return float(epoch)
    return max(os.stat(path).st_mtime for name, path in files.items()
               if name.startswith("odmr/") and name.endswith(SUFFIXES))


def write_archive(files: Dict[str, str], output: str) -> None:
    """Write the zipapp atomically: shebang, then a deterministic zip."""
    stamp = time.gmtime(max(_source_date(files), 315532800))[:6]     # zip dates start in 1980
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        entries = dict((name, None) for name in files)
        entries["__main__.py"] = None
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            if name == "__main__.py":
                data = MAIN
            else:
                with open(files[name], "rb") as fh:
                    data = fh.read()
            archive.writestr(info, data)
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".odmrd.pyz.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(SHEBANG)
            fh.write(buffer.getvalue())
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def default_source_root() -> str:
    """The checkout this module lives in."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(output: Optional[str] = None, source_root: Optional[str] = None, fetch: bool = False) -> str:
    """Build the zipapp; returns its path."""
    root = source_root or default_source_root()
    output = output or os.path.join(root, "dist", "odmrd.pyz")
    files, tempdir = collect(root, fetch)
    try:
        tempdir = tempdir or tempfile.mkdtemp(prefix="odmrd-build.")
        files.update(byte_code(files, tempdir))
        write_archive(files, output)
    finally:
        if tempdir:
            shutil.rmtree(tempdir, ignore_errors=True)
    return output


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m odmr.build",
                                     description="Build the single-file odmrd.pyz (a zipapp).")
    parser.add_argument("-o", "--output", help="where to write it (default: dist/odmrd.pyz in the checkout)")
    parser.add_argument("--fetch", action="store_true",
                        help="take configobj and idna from PyPI (pip) even if installed")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EX_OK if exc.code == 0 else EX_USAGE
    try:
        path = build(args.output, fetch=args.fetch)
    except BuildError as exc:
        print("odmr.build: %s" % exc, file=sys.stderr)
        return EX_UNAVAILABLE
    except OSError as exc:
        print("odmr.build: %s: %s" % (getattr(exc, "filename", "") or "", exc.strerror or exc),
              file=sys.stderr)
        return EX_CANTCREAT
    print("wrote %s (%d bytes)" % (path, os.path.getsize(path)))
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
