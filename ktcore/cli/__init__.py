"""``kt``: one command, one module per subcommand (``ktcore/cli/<name>.py`` exposing ``add_parser``).

A subcommand module's ``add_parser(subparsers)`` adds its parser and sets ``func`` with
``parser.set_defaults(func=...)``; ``func(args)`` returns the exit status (``None`` means 0). Errors that
are the user's to fix (rule files, op names, weights) are printed without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys

from .run import user_errors

SUBCOMMANDS = ["plugins", "rules", "run", "chat", "serve", "bench"]

EPILOG = """\
examples:
  kt plugins                                   which backends are installed, which ops can run here
  kt rules check my-rules.yaml --model ./Qwen3-30B-A3B-Q4_K_M.gguf
                                               what each module becomes, without reading weights
  kt rules check --model qwen3_moe              which shipped rule file this machine would use
  kt <command> --help                          details of one command
"""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="kt",
        description="Run large (Mixture-of-Experts) LLMs on one machine: GPU for the dense part, CPU for the "
        "experts, GGUF weights kept quantized.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ktcore {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module_name = f"{__name__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # this subcommand is not part of this installation
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status = func(args)
    except user_errors() as exc:
        print(f"kt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)


def console_main() -> None:
    """The ``kt`` script: ``main()``, then the exit handlers, then the process ends without tearing the
    interpreter down (freeing every module of torch and Transformers one by one takes 2-4 s, after the reply)."""
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a closed pipe, or a stream the command closed
        pass
    atexit._run_exitfuncs()  # logging's shutdown, the prefix stores' writer threads
    os._exit(status)


if __name__ == "__main__":
    console_main()
