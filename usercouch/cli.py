"""The ``usercouch`` command line: start a couch, run a command beside one, manage engines.

Every subcommand validates its arguments before anything is created or started, reports
progress on stderr, and turns errors into one line and a non-zero status (``--debug``
shows the traceback instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

from . import __version__
from .config import AUTH_MODES, BIND_ADDRESSES, credentialed_url
from .couch import DEFAULT_TIMEOUT, UserCouch
from .engines import Engine, get_engine, survey
from .errors import UserCouchError
from .layout import check_basedir
from .misc import TempCouch

#: Signals that stop ``start`` (and abort a starting ``run``); ``run`` forwards them to CMD.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UsageError(UserCouchError):
    """Bad command-line input found after argparse (exit status 2)."""


class CommandError(UserCouchError):
    """The command given to ``run`` cannot be executed (exit status 126 or 127)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Stopped(BaseException):
    """Raised out of whatever the main thread is doing when a stop signal arrives."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Progress:
    """Progress lines on stderr, unless ``--quiet``."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            # A reader that went away (a closed pipe) must not turn progress into an error.
            with contextlib.suppress(OSError):
                print(f"usercouch: {message}", file=sys.stderr, flush=True)


def _out(text: str) -> None:
    print(text, flush=True)


# -- signals ----------------------------------------------------------------------------------


def _keyboard_reached_child() -> bool:
    """True if we are the foreground job of a terminal: a SIGINT then came from the
    keyboard and already reached a child in our process group."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _Signals:
    """While active, a stop signal raises :class:`_Stopped` in the main thread (once), or,
    once ``child`` is set, is forwarded to the child instead.

    Raising (rather than setting a flag) means a blocking wait ends at once, with no
    sleep loop, and a start in progress is abandoned through the normal cleanup paths.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return  # ignored, so it cannot interrupt the cleanup already under way
        child = self.child
        if child is None:
            self.stopping = True
            raise _Stopped(signum)
        # A child decides for itself how to stop; once it exited, the cleanup just runs.
        if child.returncode is None and (
            signum != signal.SIGINT or not _keyboard_reached_child()
        ):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)


def _wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` (our child) exits; a stop signal raises out of it."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): wait for a signal only
        while True:
            signal.pause()
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


# -- couches ----------------------------------------------------------------------------------


def _couch(basedir: str | None, engine: Engine, timeout: float) -> UserCouch:
    """A UserCouch on ``basedir``, or a TempCouch (its basedir is removed afterwards)."""
    if basedir is None:
        return TempCouch(engine, timeout=timeout)
    return UserCouch(basedir, engine, timeout=timeout)


def _bootstrap(couch: UserCouch, args: argparse.Namespace, progress: _Progress) -> dict[str, Any]:
    progress(f"starting a couch in {couch.basedir} with {couch.engine.describe()} ...")
    env = couch.bootstrap(auth=args.auth, config={"bind_address": args.bind})
    progress(f"server up at {env['url']} (pid {couch.pid})")
    return env


def _shell_lines(env: dict[str, Any]) -> list[str]:
    return [
        f"export USERCOUCH_ENV={shlex.quote(json.dumps(env, separators=(',', ':')))}",
        f"export COUCHDB_URL={shlex.quote(credentialed_url(env))}",
    ]


def _summary(couch: UserCouch, env: dict[str, Any], temporary: bool) -> list[str]:
    lines = [
        f"{couch.engine.name} {couch.version or '(version unknown)'} running, pid {couch.pid}",
        f"  url:      {env['url']}",
    ]
    if "basic" in env:
        lines.append(f"  username: {env['basic']['username']}")
        lines.append("  password: (not shown; use --json or --shell to get it)")
    else:
        lines.append("  auth:     open (no credentials needed)")
    note = " (temporary: removed on exit)" if temporary else ""
    lines.append(f"  basedir:  {couch.basedir}{note}")
    lines.append(f"  log:      {couch.logfile}")
    lines.append("Stop it with Ctrl-C (or SIGTERM).")
    return lines


def _exit_status(signum: int) -> int:
    return 128 + signum


# -- subcommands ------------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    """Start a couch, print its env, and keep it running until a stop signal."""
    basedir = check_basedir(args.basedir) if args.basedir is not None else None
    engine = get_engine(args.engine)
    progress = _Progress(args.quiet)
    running = False
    try:
        with _Signals(), _couch(basedir, engine, args.timeout) as couch:
            env = _bootstrap(couch, args, progress)
            running = True  # before printing: a caller may signal as soon as it reads the env
            if args.json:
                _out(json.dumps(env))
            elif args.shell:
                _out("\n".join(_shell_lines(env)))
            else:
                _out("\n".join(_summary(couch, env, basedir is None)))
            pid = couch.pid
            assert pid is not None
            _wait_for_exit(pid)
            raise UserCouchError(
                f"the server exited on its own; last lines of its log:\n{couch.log_tail(15)}"
            )
    except _Stopped as stop:
        progress("server stopped")
        return 0 if running else _exit_status(stop.signum)


def _resolve_command(command: list[str]) -> list[str]:
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("run needs a command: usercouch run [options] -- CMD [ARG ...]")
    program = command[0]
    if os.sep in program:
        if not os.path.exists(program):
            raise CommandError(f"command not found: {program!r}", 127)
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            raise CommandError(f"command is not executable: {program!r}", 126)
    elif shutil.which(program) is None:
        raise CommandError(f"command not found: {program!r} (not on PATH)", 127)
    return command


def cmd_run(args: argparse.Namespace) -> int:
    """Run a command beside a throwaway couch; exit with the command's status."""
    command = _resolve_command(list(args.command))
    engine = get_engine(args.engine)
    progress = _Progress(args.quiet)
    try:
        with _Signals() as signals, _couch(None, engine, args.timeout) as couch:
            env = _bootstrap(couch, args, progress)
            child_env = dict(os.environ)
            child_env["USERCOUCH_ENV"] = json.dumps(env)
            child_env["COUCHDB_URL"] = credentialed_url(env)
            try:
                signals.child = subprocess.Popen(command, env=child_env)
            except OSError as exc:
                raise CommandError(f"cannot run {command[0]!r}: {exc.strerror}", 126) from exc
            returncode = signals.child.wait()
        progress("server stopped")
    except _Stopped as stop:
        progress("server stopped")
        return _exit_status(stop.signum)
    return returncode if returncode >= 0 else _exit_status(-returncode)


def cmd_install(args: argparse.Namespace) -> int:
    """Install an engine for this user (only PouchDB Server can be installed this way)."""
    from .engines import pouchdb

    home = pouchdb.install(args.prefix, progress=_Progress(args.quiet))
    _out(home)
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    """Say which engines are usable here, where, which version, and which one is picked."""
    found = survey()
    if args.json:
        report: dict[str, Any] = {"engines": {}, "auto": found.auto, "env": found.requested}
        for name, item in found.engines.items():
            if isinstance(item, Engine):
                report["engines"][name] = {
                    "usable": True, "version": item.version, "description": item.describe(),
                }
            else:
                report["engines"][name] = {"usable": False, "reason": str(item)}
        _out(json.dumps(report))
    else:
        for name, item in found.engines.items():
            if isinstance(item, Engine):
                mark = "  <- auto-detection picks this" if name == found.auto else ""
                _out(f"{name}: {item.describe()}{mark}")
            else:
                _out(f"{name}: not usable")
                _out("\n".join("    " + line for line in str(item).splitlines()))
        if found.requested:
            _out(f"USERCOUCH_ENGINE={found.requested} is set: it overrides auto-detection")
    if found.auto is None:
        print("usercouch: no usable engine; see above for how to get one", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a throwaway couch, round-trip a document, print the env, stop."""
    from .http import request

    engine = get_engine(args.engine)
    progress = _Progress(args.quiet)
    with _couch(None, engine, args.timeout) as couch:
        env = _bootstrap(couch, args, progress)
        created = request(env, "PUT", "/demo")
        saved = request(env, "PUT", "/demo/hello", body={"greeting": "hello, couch"})
        fetched = request(env, "GET", "/demo/hello").json()
        if created.status != 201 or saved.status != 201 or fetched["greeting"] != "hello, couch":
            raise UserCouchError(f"document round trip failed: {fetched!r}")
        progress(f"round-tripped document {fetched['_id']!r} rev {fetched['_rev']}")
        _out(json.dumps(env, indent=2))
    progress("server stopped")
    return 0


# -- parsing ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line (exposed for the docs and the tests)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help="show the traceback on errors",
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress messages on stderr"
    )
    couch = _Parser(add_help=False)
    couch.add_argument(
        "--engine", metavar="NAME",
        help="engine to run: pouchdb, couchdb (default: $USERCOUCH_ENGINE, else auto-detect)",
    )
    couch.add_argument(
        "--auth", choices=AUTH_MODES, default="basic",
        help="basic: an admin with a random password, anonymous requests refused (default); "
        "open: no credentials at all",
    )
    couch.add_argument(
        "--bind", choices=BIND_ADDRESSES, default="127.0.0.1", metavar="ADDR",
        help="address to listen on: " + ", ".join(BIND_ADDRESSES) + " (default: 127.0.0.1)",
    )
    couch.add_argument(
        "--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"give up if the server is not ready after this long (default: {DEFAULT_TIMEOUT:g})",
    )

    parser = _Parser(
        prog="usercouch",
        description="Private CouchDB-compatible servers for users, apps and tests.",
    )
    parser.add_argument("--version", action="version", version=f"usercouch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback on errors")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "start", parents=[common, couch], help="start a couch and keep it running",
        description="Start a couch, print its env, and stop it on Ctrl-C or SIGTERM.",
    )
    p.add_argument(
        "basedir", nargs="?", metavar="BASEDIR",
        help="an existing directory to keep the couch in (default: a temporary one, "
        "removed on exit)",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the env as one JSON line")
    fmt.add_argument(
        "--shell", action="store_true",
        help="print export lines for USERCOUCH_ENV and COUCHDB_URL",
    )
    p.set_defaults(func=cmd_start)

    p = sub.add_parser(
        "run", parents=[common, couch], help="run a command beside a throwaway couch",
        description="Start a throwaway couch, run CMD with USERCOUCH_ENV and COUCHDB_URL in "
        "its environment, stop the couch, and exit with CMD's status.",
    )
    p.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]",
        help="the command to run and its arguments",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "engines", parents=[common], help="list engines: usable or not, where, which version",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(func=cmd_engines)

    p = sub.add_parser("install", parents=[common], help="install an engine for this user")
    p.add_argument("engine", choices=["pouchdb"], help="the engine to install")
    p.add_argument("--prefix", metavar="DIR", help="install here instead of the per-user cache")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser(
        "demo", parents=[common, couch],
        help="start a throwaway couch, round-trip a document, stop",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``usercouch`` console script and ``python -m usercouch``."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        status = 1
        if isinstance(exc, UsageError):
            status = 2
        elif isinstance(exc, CommandError):
            status = exc.status
        elif not isinstance(exc, (UserCouchError, OSError, ValueError, TypeError)):
            message = f"internal error: {type(exc).__name__}: {exc} (run with --debug for more)"
            print(f"usercouch: error: {message}", file=sys.stderr)
            return 1
        first, *detail = str(exc).splitlines() or [""]
        # One line to grep for; the detail (where we looked, the server log) indented below.
        lines = [f"usercouch: error: {first}"] + ["    " + line for line in detail]
        print("\n".join(lines), file=sys.stderr)
        return status
