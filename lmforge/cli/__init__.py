"""The `lmforge` command. Each subcommand lives in its own module with add_parser() and run()."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lmforge.cli import embed, evaluate, export, finetune, glue, predict, serve

COMMANDS = {"embed": embed, "finetune": finetune, "evaluate": evaluate, "predict": predict,
            "glue": glue, "export": export, "serve": serve}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and ignored")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub.add_parser(name, help=module.__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                         description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmforge.errors import LmforgeError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args) or 0
    except LmforgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lmforge embed ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
