"""`make bench`: every benchmark, in the quick form unless --full is given."""

import sys

from benchmarks import glue, int8, serve, speed


def main() -> int:
    full = "--full" in sys.argv[1:]
    quick = [] if full else ["--quick"]
    return speed.main(quick) or serve.main(quick) or glue.main(quick) or int8.main(quick)


if __name__ == "__main__":
    sys.exit(main())
