"""The ``usercouch`` command line: install an engine, start a couch, run a command beside one."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence

from . import __version__
from .errors import UserCouchError


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_install(args: argparse.Namespace) -> int:
    from .engines import pouchdb

    home = pouchdb.install(args.prefix, progress=_progress)
    print(home)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a throwaway couch, round-trip a document, print the env, stop."""
    from .couch import UserCouch
    from .http import request

    with tempfile.TemporaryDirectory(prefix="usercouch-demo-") as basedir:
        with UserCouch(basedir, engine=args.engine) as couch:
            _progress(f"starting {couch.engine.describe()} in {basedir} ...")
            env = couch.bootstrap()
            _progress(f"server up at {env['url']} (version {couch.version})")
            created = request(env, "PUT", "/demo")
            saved = request(env, "PUT", "/demo/hello", body={"greeting": "hello, couch"})
            fetched = request(env, "GET", "/demo/hello").json()
            if created.status != 201 or saved.status != 201 or fetched["greeting"] != "hello, couch":
                raise UserCouchError(f"document round trip failed: {fetched!r}")
            _progress(f"round-tripped document {fetched['_id']!r} rev {fetched['_rev']}")
            print(json.dumps(env, indent=2))
        _progress("server stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usercouch", description="Private CouchDB-compatible servers for users and tests."
    )
    parser.add_argument("--version", action="version", version=f"usercouch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install", help="install an engine (pouchdb) for this user")
    p.add_argument("engine", choices=["pouchdb"])
    p.add_argument("--prefix", help="install here instead of the per-user cache")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("demo", help="start a throwaway couch, round-trip a document, stop")
    p.add_argument("--engine", help="engine name (default: auto-detect)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except (UserCouchError, OSError, ValueError, TypeError) as exc:
        if args.debug:
            raise
        print(f"usercouch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
