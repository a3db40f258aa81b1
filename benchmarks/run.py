"""`make bench`: every benchmark, in the quick form unless --full is given."""

import sys

from benchmarks import glue, serve, speed


def main() -> int:
    full = "--full" in sys.argv[1:]
    quick = [] if full else ["--quick"]
    return speed.main(quick) or serve.main(quick) or glue.main(quick)


if __name__ == "__main__":
    sys.exit(main())
