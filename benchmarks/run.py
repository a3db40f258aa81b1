"""`make bench`: every benchmark, in the quick form unless --full is given (`make bench BENCH_ARGS=--full`).

The full form is long: benchmarks.speed alone measures three ISA settings (about 30-40 minutes on an
idle machine), and benchmarks.glue trains every method on every task. Not run here, for their
length: benchmarks.soak (10 minutes of server load) and benchmarks.cramming (four pre-training runs
of up to an hour each, then fine-tuning). benchmarks.e2e (SmolLM2-135M fine-tuned four ways on E2E, then
beam-search decoding: hours on a CPU) runs with --full only.
"""

import sys

from benchmarks import bf16_quality, decode, distributed, e2e, embed_bf16, glue, int8, nanogpt, serve, speed


def main() -> int:
    full = "--full" in sys.argv[1:]
    quick = [] if full else ["--quick"]
    return (speed.main(quick) or serve.main(quick) or glue.main(quick) or int8.main(quick)
            or embed_bf16.main([]) or bf16_quality.main(quick) or nanogpt.main(quick) or decode.main(quick)
            or distributed.main(quick)
            or (e2e.main([]) if full else 0))


if __name__ == "__main__":
    sys.exit(main())
