"""
The C{pgtls} command line.

C{check} validates a configuration and prints what it would run;
C{admin-verifier} prints an C{admin.password_file} line for a password;
C{worker} is what the supervisor of C{workers = N} starts (see
L{pgtls_twisted.app._workers}), not meant to be run by hand.
C{check} exists so that a configuration can be tested in CI or before a
restart without binding any port: a typo must never be found by a proxy
that fails to come back up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pgtls_twisted._version import __version__
from pgtls_twisted.config import ConfigError, describe_config, load_config
from pgtls_twisted.protocol._scram import make_verifier

EXIT_OK = 0
EXIT_INVALID = 1


def _check(args: argparse.Namespace) -> int:
    """
    Validate the configuration and print its summary.

    @return: L{EXIT_OK}, or L{EXIT_INVALID} after printing every problem
        to stderr.
    """
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        count = len(e.messages)
        print(
            f"pgtls: configuration is invalid ({count} problem{'s' if count != 1 else ''})",
            file=sys.stderr,
        )
        return EXIT_INVALID
    sys.stdout.write(describe_config(config))
    count = len(config.routes)
    print(f"\nconfiguration OK: {count} route{'s' if count != 1 else ''}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """
    Build the argument parser; separate from L{main} so later subcommands
    (and tests) can extend or inspect it.
    """
    parser = argparse.ArgumentParser(
        prog="pgtls",
        description="A TLS-terminating proxy for PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check",
        help="validate a configuration file and print the routes it defines",
        description=(
            "Validate a configuration file (including that the certificate files it names"
            " exist and are readable) and print the routes it would run. Binds nothing."
        ),
    )
    check.add_argument(
        "-c", "--config", required=True, metavar="FILE", help="the TOML configuration file"
    )
    check.set_defaults(handler=_check)

    verifier = commands.add_parser(
        "admin-verifier",
        help="print an admin.password_file line (a SCRAM-SHA-256 verifier) for a password",
        description=(
            "Read a password (asked for twice on a terminal, else the first line of standard"
            " input) and print NAME:SCRAM-SHA-256$... for admin.password_file. The password"
            " itself is not stored anywhere."
        ),
    )
    verifier.add_argument("name", help="the admin console user name")
    verifier.add_argument(
        "--iterations", type=int, default=4096, help="PBKDF2 iterations (PostgreSQL's default 4096)"
    )
    verifier.set_defaults(handler=_admin_verifier)

    worker = commands.add_parser("worker", help="(internal) one worker process of workers = N")
    worker.add_argument("--config", required=True)
    worker.add_argument("--index", required=True, type=int)
    worker.add_argument("--run-dir", required=True)
    worker.add_argument("--short-dispatch", action="store_true")
    worker.set_defaults(handler=_worker)
    return parser


def _admin_verifier(args: argparse.Namespace) -> int:
    """Print C{name:verifier}; the password comes from a prompt or stdin, never argv."""
    import getpass

    if args.iterations < 4096:
        print("pgtls: --iterations must be at least 4096", file=sys.stderr)
        return EXIT_INVALID
    if ":" in args.name:
        print("pgtls: a user name in admin.password_file cannot contain ':'", file=sys.stderr)
        return EXIT_INVALID
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("pgtls: the passwords differ", file=sys.stderr)
            return EXIT_INVALID
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("pgtls: empty password", file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.name}:{make_verifier(password, args.iterations)}")
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    # Imported when run: the whole proxy is not needed to check a file.
    from pgtls_twisted.app._workers import run_worker

    return run_worker(args.config, args.index, args.run_dir, args.short_dispatch)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line.

    Usage errors and C{--help}/C{--version} make argparse exit; that is
    turned into a return value so L{main} can be called from tests.

    @param argv: the arguments, without the program name; L{None} means
        C{sys.argv[1:]}.
    @return: the process exit status.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    handler = args.handler
    status: int = handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
