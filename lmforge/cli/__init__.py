"""The `lmforge` command. Each subcommand lives in its own module with add_parser() and run()."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lmforge.cli import embed, env, evaluate, export, finetune, generate, glue, predict, pretrain, serve, tokenizer

COMMANDS = {"embed": embed, "env": env, "finetune": finetune, "evaluate": evaluate, "predict": predict,
            "glue": glue, "export": export, "serve": serve, "tokenizer": tokenizer, "pretrain": pretrain,
            "generate": generate}


def build_parser() -> argparse.ArgumentParser:
    from lmforge.cli.validate import Parser

    parser = Parser(prog="lmforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and ignored")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub.add_parser(name, help=module.__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                         description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for any refused input, with one line on stderr)."""
    from lmforge.errors import LmforgeError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # option types and ranges are checked here (cli/validate.py), before any command runs
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its one line (or --help)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            return COMMANDS[args.command].run(args) or 0
        finally:
            _leave_process_group()
    except LmforgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lmforge embed ... | head`
        return 0
    # Last resorts for what no check above foresaw: still one line, naming the file when known.
    except OSError as e:  # a read-only file system, a full disk, a permission
        where = f"{e.filename}: " if e.filename else ""
        print(f"lmforge {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"lmforge {args.command}: error: a file is not UTF-8 text ({e.reason} at byte {e.start})",
              file=sys.stderr)
        return 2


def _leave_process_group() -> None:
    """Under torchrun a training command joined a process group: leave it cleanly."""
    distributed = sys.modules.get("lmforge.train.distributed")   # not imported: nothing to leave
    if distributed is not None:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
