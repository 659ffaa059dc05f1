"""The two expert layouts side by side: ``mpirun -n P python -m bench.moe [--preset NAME] [--json-out PATH]``.

For a mixture-of-experts preset (random weights, each rank drawing only its shard) it runs one prefill and a
greedy decode in each layout (``--experts tensor`` and ``expert``) and reports, per layout:

- the bytes each rank sent per token and per layer for the MLP part, counted at every collective the mixture
  makes (``Counting``: what a textbook algorithm sends, for an Allreduce of n bytes 2 (P - 1) / P n, an
  Allgatherv (P - 1) / P of the whole, an Alltoallv the rows addressed to other ranks), next to the arithmetic of
  ``mpitp.experts.bytes_per_token`` for an even spread over the experts, and at the routing the run made
  (``routed_pairs``: the pairs that left their rank), which the counts equal;
- the expert-load imbalance of the prefill (tokens per expert of each layer, max over mean);
- prefill and decode tokens/s, the slowest rank's, the mean of ``-r`` runs, with the machine's load average:
  figures taken on a busy machine are no result (the JSON keeps the load beside them).

Attention's Allreduce #1 is the same in both layouts and left out of the bytes.
"""

import json
import os
import time
import zlib

import numpy as np

from mpitp import comm as mpi
from mpitp.cli.runner import check_writable, replace_file, say
from mpitp.config import config_from_dict
from mpitp.errors import MpitpError
from mpitp.experts import bytes_per_token, load_imbalance, routed_pairs
from mpitp.generation import generate_sequence
from mpitp.model import Model
from mpitp.resources import set_blas_threads
from mpitp.sampling import Sampler
from mpitp.sharding import EXPERT_LAYOUTS, shard_for
from mpitp.weights import load_weights

from . import PROG, BenchParser
from .models import RandomCheckpoint

PRESETS = {
    # For the tests: seconds, not minutes.
    "mixtral-tiny": {"model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "intermediate_size": 48, "num_local_experts": 6, "num_experts_per_tok": 2, "vocab_size": 256,
                     "max_position_embeddings": 256},
    # Mixtral's routing (8 experts, top-2, renormalized) and its expert width ratio (3.5 n_embd), at a width and
    # depth this machine holds (about 120M parameters).
    "mixtral-small": {"model_type": "mixtral", "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8,
                      "num_hidden_layers": 4, "intermediate_size": 1792, "num_local_experts": 8,
                      "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 4096},
    # OLMoE's routing (64 experts, top-8, narrow experts of n_embd / 2) at the same scale.
    "olmoe-small": {"model_type": "olmoe", "hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 4,
                    "intermediate_size": 256, "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
                    "max_position_embeddings": 4096},
}


class SharedRouter(RandomCheckpoint):
    """``RandomCheckpoint`` whose routers (and shared-expert gates), which every rank holds whole, are drawn
    alike on every rank (from the tensor's name): ranks with different routers would route differently."""

    def read_into(self, name, out, index=(), transpose=False):
        if name.endswith("gate.weight"):
            self.rng, rng = np.random.default_rng(zlib.crc32(name.encode())), self.rng
            super().read_into(name, out, index, transpose)
            self.rng = rng
        else:
            super().read_into(name, out, index, transpose)


class Counting:
    """A communicator that counts the bytes this rank sends at each collective, by the textbook algorithms; only
    while ``counting`` (the model's MLP flows) is set."""

    def __init__(self, comm):
        self.comm, self.sent, self.counting = comm, 0.0, False

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def Allreduce(self, sendbuf, recvbuf, op=None):
        P = self.comm.Get_size()
        self.sent += self.counting * 2 * (P - 1) / P * recvbuf.nbytes
        return self.comm.Allreduce(sendbuf, recvbuf, op=op) if op is not None else self.comm.Allreduce(sendbuf,
                                                                                                        recvbuf)

    def Alltoallv(self, sendspec, recvspec):
        buf, counts, _, _ = sendspec
        self.sent += self.counting * (sum(counts) - counts[self.comm.Get_rank()]) * buf.itemsize
        return self.comm.Alltoallv(sendspec, recvspec)

    def Allgatherv(self, sendbuf, recvspec):
        self.sent += self.counting * (self.comm.Get_size() - 1) * sendbuf.nbytes
        return self.comm.Allgatherv(sendbuf, recvspec)


def moe_model(config, comm, layout, dtype=np.float32):
    """A random-weight ``Model`` of ``config`` in ``layout``, each rank drawing only its shard; its MLP flows
    count their bytes on ``model.comm`` (a ``Counting``) and keep each forward's routing in ``model.routes``."""
    counting = Counting(comm)
    shard = shard_for(config, comm.Get_rank(), comm.Get_size(), layout)
    model = Model(config, shard, *load_weights(SharedRouter(config, 0, comm.Get_rank()), config, shard, dtype),
                  counting, dtype)
    flow, model.routes = model.moe_mlp, []

    def counted(C, R, w):
        model.routes.append(R)
        counting.counting = True
        try:
            return flow(C, R, w)
        finally:
            counting.counting = False
    model.moe_mlp = counted
    return model


def measure(model, n_prompt, n_gen, repeats=1):
    """One layout's figures: bytes per token and layer of a prefill and of a decode (counted, and by the
    arithmetic at the routing they ran), the prefill's load imbalance, and prefill and decode tokens/s (the
    slowest rank's) of each of ``repeats`` runs."""
    comm, cfg = model.comm, model.config
    prompt = np.random.default_rng(0).integers(0, cfg.n_vocab, n_prompt)
    figures = {"prefill_tokens_per_s_per_repeat": [], "decode_tokens_per_s_per_repeat": []}
    for repeat in range(repeats):
        comm.sent, model.routes = 0.0, []
        comm.Barrier()
        t = time.perf_counter()
        model.forward(prompt, model.new_cache(n_prompt), gather=False)
        figures["prefill_tokens_per_s_per_repeat"].append(n_prompt / mpi.max_over_ranks(comm, time.perf_counter() - t))
        prefill = (mpi.allreduce_scalar(comm, comm.sent, "sum", np.float64) / comm.Get_size(), model.routes)
        comm.sent, model.routes = 0.0, []
        decode_s = generate_sequence(model, [0], n_gen + 1, Sampler()).timing.decode_seconds
        figures["decode_tokens_per_s_per_repeat"].append(n_gen / mpi.max_over_ranks(comm, decode_s))
        decode = (mpi.allreduce_scalar(comm, comm.sent, "sum", np.float64) / comm.Get_size(), model.routes)
        if repeat == 0:  # the same routing, and so the same bytes, every repeat
            figures.update(_bytes_and_load(model, prefill, decode, n_prompt, n_gen))
    for phase in ("prefill", "decode"):
        figures[f"{phase}_tokens_per_s"] = float(np.mean(figures[f"{phase}_tokens_per_s_per_repeat"]))
    return figures


def _bytes_and_load(model, prefill, decode, n_prompt, n_gen):
    # (sent, routes) of a prefill and of a decode: bytes per token and layer, counted and by the arithmetic at
    # those routes (the expert layout's pairs that left their rank), and the prefill's expert load
    cfg, P, layout = model.config, model.shard.size, model.shard.experts
    per, itemsize = cfg.n_layer, np.dtype(model.dtype).itemsize
    counts = np.sum([load_imbalance(R)[0] for R in prefill[1]], axis=0)
    imbalance = [load_imbalance(R)[1] for R in prefill[1]]
    routed = {phase: bytes_per_token(cfg, P, layout, itemsize, routed_pairs(routes, model.expert_owner, P))
              for phase, (_, routes) in (("prefill", prefill), ("decode", decode))}
    return {"mlp_bytes_per_token_per_layer": {"prefill": prefill[0] / (n_prompt * per),
                                              "decode": decode[0] / ((n_gen + 1) * per)},
            "mlp_bytes_at_the_routing": routed, "tokens_per_expert": counts.tolist(), "imbalance_per_layer": imbalance,
            "imbalance_max_over_mean": float(max(imbalance))}


def run(args, comm):
    cfg = config_from_dict(PRESETS[args.preset])
    itemsize, size = np.dtype(np.float32).itemsize, comm.Get_size()
    rec = {"preset": args.preset, "ranks": size, "dtype": "float32", "n_prompt": args.n_prompt, "n_gen": args.n_gen,
           "repeats": getattr(args, "repeats", 1), "load_average_1min_before": os.getloadavg()[0], "layouts": {}}
    for layout in EXPERT_LAYOUTS:
        if layout == "tensor" and cfg.n_ffn_expert < size:
            continue
        figures = measure(moe_model(cfg, comm, layout), args.n_prompt, args.n_gen, rec["repeats"])
        figures["mlp_bytes_per_token_per_layer"]["arithmetic"] = bytes_per_token(cfg, size, layout, itemsize)
        rec["layouts"][layout] = figures
    rec["load_average_1min_after"] = os.getloadavg()[0]
    return rec


def report(rec):
    """The record as a few lines of text."""
    lines = [f"bench.moe: {rec['preset']} on {rec['ranks']} ranks, float32; load average "
             f"{rec['load_average_1min_before']:.2f} before, {rec['load_average_1min_after']:.2f} after (above 1.5: "
             f"the tok/s are no result)",
             "MLP bytes per token and layer: the arithmetic of an even spread, counted at the collectives of a prefill "
             "and a decode, and the arithmetic at the routing they ran (prefill / decode); tokens/s: the mean of "
             f"{rec.get('repeats', 1)} run(s)",
             f"{'layout':8} {'even spread':>11} {'prefill':>9} {'decode':>9} {'at routing':>17} "
             f"{'imbalance':>10} {'pp tok/s':>9} {'tg tok/s':>9}"]
    for layout, f in rec["layouts"].items():
        b, r = f["mlp_bytes_per_token_per_layer"], f.get("mlp_bytes_at_the_routing")
        at = f"{r['prefill']:.0f} / {r['decode']:.0f}" if r else "-"
        lines.append(f"{layout:8} {b['arithmetic']:11.0f} {b['prefill']:9.0f} {b['decode']:9.0f} {at:>17} "
                     f"{f['imbalance_max_over_mean']:10.2f} {f['prefill_tokens_per_s']:9.1f} "
                     f"{f['decode_tokens_per_s']:9.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = BenchParser(prog="python -m bench.moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-small")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=16)
    p.add_argument("-r", "--repeats", type=int, default=3, help="timed runs of each layout (default 3)")
    p.add_argument("--json-out", metavar="PATH")
    args = p.parse_args(argv)
    comm = mpi.world()
    try:  # every rank checks the same things, before any collective: all fail alike
        if not (1 <= args.n_prompt and 1 <= args.n_gen and args.n_prompt + args.n_gen + 1 <= 4096):
            raise MpitpError(f"-p {args.n_prompt} and -n {args.n_gen} must be at least 1, with at most 4095 together.")
        if args.repeats < 1:
            raise MpitpError(f"-r {args.repeats}: give at least 1 run.")
        if args.json_out:
            check_writable(args.json_out, f"--json-out {args.json_out}")
    except MpitpError as e:
        say(f"{PROG}: error: {e}")
        return 2
    set_blas_threads(None, mpi.ranks_on_node(comm))  # the node's cores over its ranks, unless the environment says
    rec = run(args, comm)
    if comm.Get_rank() == 0:
        print(report(rec))
        if args.json_out:
            replace_file(args.json_out, lambda f: f.write(json.dumps(rec, indent=1).encode()),
                         f"--json-out {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
