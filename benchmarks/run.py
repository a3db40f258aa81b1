"""`make bench`: every benchmark, in the quick form unless --full is given."""

import sys

from benchmarks import glue


def main() -> int:
    full = "--full" in sys.argv[1:]
    return glue.main([] if full else ["--quick"])


if __name__ == "__main__":
    sys.exit(main())
