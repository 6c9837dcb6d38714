"""`gradguard demo | bench | serve | client`.

Each subcommand lives with the code it drives and registers itself through a
``register(subparsers)`` function; this module only dispatches, and imports lazily so that
``gradguard serve`` never loads the evaluation stack.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines register(subparsers)
COMMANDS: dict[str, str] = {
    "demo": "gradguard.demo",
    "bench": "gradguard.eval.bench",
    "serve": "gradguard.transport.cli",
    "client": "gradguard.transport.cli",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradguard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = [COMMANDS[wanted]] if wanted else sorted(set(COMMANDS.values()))
    for module_name in modules:
        try:
            importlib.import_module(module_name).register(sub)
        except ImportError as err:  # an optional extra is missing: say which
            if wanted:
                raise SystemExit(f"gradguard {wanted}: cannot load {module_name} ({err}); "
                                 "install the extra it needs, e.g. pip install 'gradguard[eval]'") from err
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv  # what the user typed, for outputs that record the command that made them
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
