"""Per-rank memory of shard loading: ``mpirun -n P python bench/memory.py --model DIR [--json]``.

Each rank loads its shard (``Model.load``) and reports how much its peak resident memory grew, next to the
bytes of weights it holds: with shard-only reads, about its own weights, far below the whole model.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpitp import comm as mpi  # noqa: E402
from mpitp.cli.runner import HelpFormatter, failed_vote, run_guarded  # noqa: E402
from mpitp.errors import MpitpError  # noqa: E402
from bench import PROG, BenchParser  # noqa: E402 -- its errors read "bench: error: ..." like the bench's
from bench.timing import rss_bytes  # noqa: E402
from mpitp.model import DTYPES, Model  # noqa: E402
from mpitp.weights import n_params  # noqa: E402


def main(argv=None):
    comm = mpi.world()
    p = BenchParser(prog="python bench/memory.py", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.rank = comm.Get_rank()
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the weights are cast to")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks for errors")
    args = p.parse_args(argv)
    return run_guarded(comm, lambda: _run(args, comm), args.verbose, PROG)


def _run(args, comm):
    before = rss_bytes("VmRSS")
    error = model = None
    try:  # loading makes no MPI calls: a bad folder fails here on every rank, before the first collective
        model = Model.load(args.model, comm, args.dtype)
    except MpitpError as e:
        error = e
    if failed_vote(comm, error, PROG):
        return 2
    peak = rss_bytes("VmHWM")
    itemsize = DTYPES[args.dtype]().itemsize
    row = {"rank": comm.Get_rank(), "shard_bytes": model.weight_bytes,
           "peak_growth_bytes": peak - before, "rss_before_bytes": before}
    rows = comm.allgather(row)
    if comm.Get_rank() == 0:
        full = n_params(model.config) * itemsize
        if args.json:
            print(json.dumps({"model": args.model, "ranks": comm.Get_size(), "dtype": args.dtype,
                              "full_model_bytes": full, "per_rank": rows}))
        else:
            print(f"# {args.model}: {n_params(model.config) / 1e6:.1f}M params, {full / 1e6:.1f} MB in "
                  f"{args.dtype}, {comm.Get_size()} ranks")
            print(f"# {'rank':>4} {'weights held (MB)':>18} {'peak RSS growth at load (MB)':>29} {'growth/held':>12}")
            for r in rows:
                print(f"  {r['rank']:>4} {r['shard_bytes'] / 1e6:>18.1f} {r['peak_growth_bytes'] / 1e6:>29.1f} "
                      f"{r['peak_growth_bytes'] / r['shard_bytes']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
