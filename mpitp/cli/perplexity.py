"""The perplexity command: ``mpirun -n 2 python -m mpitp.perplexity --model DIR --file TEXT [options]``.

llama-perplexity's protocol (docs/perplexity.md): the text is cut into chunks of ``--ctx`` tokens, each one
forward, and the second half of each is scored, vocabulary-parallel (``mpitp.scoring``): no rank gathers a
row of logits. ``--kl-divergence-base`` writes every scored position's log-probabilities, ``--kl-divergence``
compares this run with them. Running figures go to stderr; the result to stdout (text, or one JSON object).
"""

import contextlib
import json
import os
import sys
import time

import numpy as np

from .runner import (HelpFormatter, RankParser, add_comm_dtype, add_experts_option, add_run_options, check_stdout,
                     check_writable, failed_vote, out, prepare_and_agree, removed_on_failure, run_command, say)
from ..errors import MpitpError, RequestError, read_regular
from ..tools.kldbase import BaseInfo, BaseReader, BaseWriter, read_info, tokens_digest
from ..model import DTYPES, FINGERPRINTED, Model
from ..resources import check_fits, set_blas_threads
from ..scoring import chunk_tokens, first_scored, mean_and_stderr, score_chunks
from ..tokenizer import TOKENIZER_FILE, Tokenizer

DEFAULT_CTX = 512  # llama.cpp's published perplexities use -c 512: figures at the same ctx compare with theirs
BATCH_TOKENS = 512  # the default --batch puts about this many tokens in a forward


def build_parser():
    prog = "mpitp-perplexity" if sys.argv[0].endswith("mpitp-perplexity") else "python -m mpitp.perplexity"
    p = RankParser(prog=prog, formatter_class=HelpFormatter,
                   description="The perplexity of a model on a text, llama-perplexity's way, with the model split "
                               "over the MPI ranks (run under mpirun -n P; without mpirun it runs on one rank).")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder, with tokenizer.json")
    p.add_argument("--file", required=True, metavar="TEXT", help="the text to score (UTF-8)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help=f"tokens per chunk; the second half of each is scored (default: {DEFAULT_CTX}, or the "
                        "model's context if shorter)")
    p.add_argument("--chunks", type=int, default=None, metavar="K", help="score the first K chunks (default: all)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help=f"chunks per forward (default: {BATCH_TOKENS} // ctx, at least 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype; weights are cast to it at load (float64 is the reference mode)")
    add_experts_option(p)
    add_comm_dtype(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    p.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                   help="write the log-probabilities of every scored position to FILE, for --kl-divergence")
    p.add_argument("--kl-divergence", metavar="FILE", default=None,
                   help="compare this run with the base FILE (same model, text, --ctx, --chunks): mean KL "
                        "divergence, the fraction of positions whose top token agrees, and the base's perplexity")
    return add_run_options(p)


def _check_options(args):
    for name in ("threads", "ctx", "chunks", "batch"):
        value = getattr(args, name)
        if value is not None and value < (3 if name == "ctx" else 1):
            raise RequestError(f"--{name} must be >= {3 if name == 'ctx' else 1}, got {value}"
                               + (" (a chunk scores its tokens after the first half)." if name == "ctx" else "."))
    if args.kl_divergence_base is not None and args.kl_divergence is not None:
        raise RequestError("give --kl-divergence-base (write a base) or --kl-divergence (compare with one), not both.")


def _read_text(path):
    text = read_regular(path)
    if not text.strip():
        raise RequestError(f"{path} is empty; give a text to score.")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{path} is not UTF-8 text (byte {text[e.start]:#04x} at offset {e.start}).") from None


def _prepare(args, comm, node_ranks):
    """Everything that bad input can fail, with no communication: load, tokenize, chunk, allocate the KV
    cache, read the base's header."""
    _check_options(args)
    if comm.Get_rank() == 0:
        check_stdout()
    model = Model.load(args.model, comm, args.dtype, node_ranks=node_ranks, experts=args.experts,
                       comm_dtype=args.comm_dtype)
    cfg, shard = model.config, model.shard
    if not os.path.exists(os.path.join(args.model, TOKENIZER_FILE)):
        raise RequestError(f"{args.model}: there is no {TOKENIZER_FILE}; scoring a text needs the model's tokenizer.")
    tokenizer = Tokenizer(args.model, cfg.bos_token_id)
    ids = tokenizer.encode(_read_text(args.file))
    ctx = args.ctx if args.ctx is not None else min(DEFAULT_CTX, cfg.n_ctx)
    if ctx > cfg.n_ctx:
        raise RequestError(f"--ctx {ctx} is more than the model's context of {cfg.n_ctx} positions.")
    if len(ids) < ctx:
        raise RequestError(f"{args.file} is {len(ids)} tokens, shorter than one chunk of --ctx {ctx}; give a "
                           "longer text or a smaller --ctx.")
    chunks = chunk_tokens(ids, ctx, args.chunks or len(ids), cfg.bos_token_id if tokenizer.add_bos else None)
    n_batch = min(args.batch or max(1, BATCH_TOKENS // ctx), len(chunks))
    cache = model.new_cache(ctx, n_batch)
    rows = n_batch * (ctx - first_scored(ctx))  # the scored half's logits: two batches' while one is scored
    check_fits((6 if args.kl_divergence else 3) * rows * shard.n_vocab_local * 8,
               f"the logits of {n_batch} chunks of {ctx} tokens", "give a smaller --batch, or use more ranks",
               node_ranks)
    info = BaseInfo(model.fingerprint, tokens_digest(chunks), ctx, len(chunks), cfg.n_vocab, args.dtype)
    base = None
    if args.kl_divergence is not None:
        base = BaseReader(args.kl_divergence, read_info(args.kl_divergence, info), shard.vocab_cols)
    if args.kl_divergence_base is not None:
        folder = os.path.dirname(os.path.abspath(args.kl_divergence_base))
        if not os.path.isdir(folder):
            raise RequestError(f"--kl-divergence-base {args.kl_divergence_base}: there is no folder {folder}.")
        check_writable(args.kl_divergence_base, f"--kl-divergence-base {args.kl_divergence_base}")
        check_writable(args.kl_divergence_base + ".partial", f"--kl-divergence-base {args.kl_divergence_base}")
    return model, len(ids), chunks, cache, n_batch, info, base


def _agreement(args, model, chunks, n_batch):
    return [(FINGERPRINTED, model.fingerprint), ("chunks' token ids (digest)", tokens_digest(chunks)),
            ("--batch", n_batch), ("--dtype", args.dtype), ("--experts", model.shard.experts),
            ("--comm-dtype", args.comm_dtype),
            ("--kl-divergence", args.kl_divergence),
            ("--kl-divergence-base", args.kl_divergence_base)]


def _open_writer(args, comm, info, cols):
    """Rank 0 creates the base file at its full size, then every rank opens it; None if any rank failed (told)."""
    error = None
    if comm.Get_rank() == 0:
        try:
            BaseWriter.create(args.kl_divergence_base, info)
        except MpitpError as e:
            error = e
    if failed_vote(comm, error, "mpitp"):
        return None
    writer = None
    try:
        writer = BaseWriter(args.kl_divergence_base, info, cols)
    except MpitpError as e:
        error = e
    if failed_vote(comm, error, "mpitp"):
        if comm.Get_rank() == 0:
            BaseWriter.discard(args.kl_divergence_base)
        return None
    return writer


def _score(args, model, chunks, cache, base, writer, rank):
    """Every batch's scores, concatenated; llama-perplexity's running figures on stderr as the chunks end."""
    running = not args.quiet and rank == 0
    parts, nll_sum, count = [], 0.0, 0
    for scores in score_chunks(model, chunks, cache, base):
        if not np.isfinite(scores.nll).all():  # the same on every rank: they all stop here
            raise RequestError(f"the model's logits are not finite in {args.dtype} (chunk {scores.chunks.start + 1}"
                               "); try --dtype float64, or check the checkpoint.")
        if writer is not None:
            writer.write(scores.chunks, scores.log_probs())
        scores.logits = None  # the large part: not kept
        parts.append(scores)
        for i, chunk_nll in zip(scores.chunks, scores.nll):
            nll_sum, count = nll_sum + chunk_nll.sum(), count + chunk_nll.size
            if running:
                sys.stderr.write(f"[{i + 1}]{np.exp(nll_sum / count):.4f},")
                sys.stderr.flush()
    if running:
        say("")
    return {k: np.concatenate([getattr(p, k) for p in parts]) if getattr(parts[0], k) is not None else None
            for k in ("nll", "kld", "same_top", "base_nll")}


def _report(args, size, n_tokens, info, n_batch, scores, seconds):
    nll_mean, nll_stderr = mean_and_stderr(scores["nll"])
    ppl = float(np.exp(nll_mean))
    result = {"model": args.model, "file": args.file, "ranks": size, "dtype": args.dtype,
              "comm_dtype": args.comm_dtype or args.dtype, "ctx": info.ctx,
              "batch": n_batch, "n_tokens": n_tokens, "n_chunks": info.n_chunks, "n_scored": int(scores["nll"].size),
              "ppl": ppl, "ppl_stderr": None if nll_stderr is None else ppl * nll_stderr, "nll_mean": nll_mean,
              "nll_stderr": nll_stderr, "seconds": seconds, "tokens_per_s": info.n_chunks * info.ctx / seconds}
    if scores["kld"] is not None:
        kld_mean, kld_stderr = mean_and_stderr(scores["kld"])
        top, _ = mean_and_stderr(scores["same_top"])
        base_mean, base_stderr = mean_and_stderr(scores["base_nll"])
        base_ppl = float(np.exp(base_mean))
        result["kld"] = {"mean": kld_mean, "stderr": kld_stderr, "max": float(scores["kld"].max()), "same_top": top,
                      "base_ppl": base_ppl, "base_ppl_stderr": None if base_stderr is None else base_ppl * base_stderr,
                      "base_nll_mean": base_mean, "file": args.kl_divergence}
    if args.kl_divergence_base is not None:
        result["kl_divergence_base"] = args.kl_divergence_base
    if args.json:
        return out(json.dumps(result))
    pm = lambda x, spec: "n/a" if x is None else f"{x:{spec}}"  # noqa: E731
    out(f"PPL = {ppl:.4f} +/- {pm(result['ppl_stderr'], '.5f')}")
    if "kld" in result:
        k = result["kld"]
        out(f"base PPL = {k['base_ppl']:.4f} +/- {pm(k['base_ppl_stderr'], '.5f')}\n"
              f"KLD = {k['mean']:.6g} +/- {pm(k['stderr'], '.3g')} (max {k['max']:.6g})\n"
              f"same top = {100 * k['same_top']:.3f} %")


def _score_into_base(args, comm, model, chunks, cache, base, info):
    """The scores and the seconds they took, every scored position written to the base file with
    ``--kl-divergence-base`` (renamed to its name once whole); None once told of an error (status 2)."""
    rank = comm.Get_rank()
    writer = _open_writer(args, comm, info, model.shard.vocab_cols) if args.kl_divergence_base else None
    if args.kl_divergence_base and writer is None:
        return None
    t = time.perf_counter()
    try:
        scores = _score(args, model, chunks, cache, base, writer, rank)
    except RequestError as e:  # found alike on every rank (the scores are)
        if rank == 0:
            say(f"mpitp: error: {e}")
            if writer is not None:
                BaseWriter.discard(args.kl_divergence_base)
        return None
    seconds = time.perf_counter() - t
    if writer is not None:
        writer.close()
        comm.Barrier()  # every rank's columns are on disk before the file takes its name
        if rank == 0:
            writer.finish()
    return scores, seconds


def _run(args, comm, node_ranks):
    rank, size = comm.Get_rank(), comm.Get_size()
    t_load = time.perf_counter()
    prepared = prepare_and_agree(comm, lambda: _prepare(args, comm, node_ranks),
                                 lambda p: _agreement(args, p[0], p[2], p[4]), "mpitp")
    if prepared is None:
        return 2
    model, n_tokens, chunks, cache, n_batch, info, base = prepared
    threads, warning = set_blas_threads(args.threads, node_ranks)
    if rank == 0 and warning:
        say(f"mpitp: {warning}")
    if rank == 0 and not args.quiet:
        say(f"mpitp: loaded {args.model} on {size} rank{'s' if size > 1 else ''}"
            f" in {time.perf_counter() - t_load:.2f} s; dtype {args.dtype}; {n_tokens} tokens, {info.n_chunks} "
            f"chunks of {info.ctx}, {n_batch} per forward; BLAS threads per rank: {threads or 'unknown'}")
    # The base's .partial file (hundreds of MB) goes whoever ends the rank: an error or a signal here (every rank
    # removes it: the folder is one that every rank sees), or the watchdog when the main thread cannot act.
    partial = args.kl_divergence_base + ".partial" if args.kl_divergence_base else None
    with removed_on_failure(partial) if partial else contextlib.nullcontext():
        scored = _score_into_base(args, comm, model, chunks, cache, base, info)
    if scored is None:
        return 2
    if rank == 0:
        _report(args, size, n_tokens, info, n_batch, *scored)
    return 0


def main(argv=None):
    """Entry point; returns the process exit status (0 ok, 2 bad input, 1 unexpected error)."""
    return run_command(build_parser, _run, "mpitp", argv)


if __name__ == "__main__":
    sys.exit(main())
