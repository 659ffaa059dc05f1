"""Perplexity and KL divergence, vocabulary-parallel: the math against a dense log-softmax of whole rows, the
command against the dense reference (tests/dense_reference.py) at 1, 2 and 3 ranks, that no vocabulary row is
gathered while scoring, the base file against its documented layout, and bad input refused before any work.

The math tests run serially and under ``mpirun -n P pytest`` (the same body on COMM_SELF and COMM_WORLD);
the command-line tests launch their own mpirun and run in the serial pass.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

from conftest import CLOSED, FULL, child_env, model_dir, mpirun, serial_only, unwritable_stdout, REPO
from dense_reference import dense_logits
from random_models import write_random_model
from mpitp import comm as mpi
from mpitp.model import Model
from mpitp.scoring import chunk_tokens, score_chunks, vocab_parallel_cross_entropy, vocab_parallel_kl_divergence
from mpitp.sharding import block_range

WORLD = MPI.COMM_WORLD
COMMS = [pytest.param(mpi.serial, id="serial"),
         pytest.param(mpi.world, id="world", marks=pytest.mark.mpi(min_size=2))]
TEXT = REPO / "mpitp" / "data" / "tensor-parallel.txt"


def log_softmax(x):
    # the dense oracle, on whole rows. [n_rows, n_vocab] -> [n_rows, n_vocab]
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("make_comm", COMMS)
@pytest.mark.parametrize("n_vocab", [101, 96])  # 101 splits unevenly over 2 and 3 ranks
def test_cross_entropy_and_kl_equal_a_dense_log_softmax(make_comm, n_vocab):
    comm = make_comm()
    rng = np.random.default_rng(n_vocab)  # the same rows on every rank
    logits = rng.standard_normal((40, n_vocab)) * 6
    base = log_softmax(logits + rng.standard_normal(logits.shape) * 0.3)
    targets = rng.integers(0, n_vocab, 40)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie for the top: the lower id is not required
    base[0, 9] = base[0].max() + 1
    logits[1] += 800  # would overflow exp without the row maximum
    start, count = block_range(n_vocab, comm.Get_size(), comm.Get_rank())
    cols = slice(start, start + count)
    nll, log_z = vocab_parallel_cross_entropy(comm, logits[:, cols].astype(np.float32), targets, start)
    logits = logits.astype(np.float32).astype(np.float64)  # what the ranks held: float32 logits
    dense = log_softmax(logits)
    assert np.abs(nll + dense[np.arange(40), targets]).max() < 1e-12
    log_p = logits[:, cols] - log_z[:, None]
    assert np.abs(log_p - dense[:, cols]).max() < 1e-12
    kld, same_top, base_nll = vocab_parallel_kl_divergence(comm, log_p, base[:, cols], targets, start)
    assert np.abs(kld - (np.exp(base) * (base - dense)).sum(axis=-1)).max() < 1e-12
    tops = lambda x: x == x.max(axis=-1, keepdims=True)  # noqa: E731 -- the top token(s) of each row
    assert same_top.tolist() == (tops(dense) & tops(base)).any(axis=-1).tolist()
    assert same_top[0] and not same_top.all() and np.array_equal(base_nll, -base[np.arange(40), targets])


class RecordingComm:
    """A communicator that records the name and buffer shapes of every call made through it."""

    def __init__(self, comm):
        self.comm, self.calls = comm, []

    def __getattr__(self, name):
        target = getattr(self.comm, name)
        if not callable(target) or name in ("Get_rank", "Get_size"):
            return target

        def record(*args, **kwargs):
            self.calls.append((name, [np.shape(a) for a in args if isinstance(a, np.ndarray)], kwargs.get("op")))
            return target(*args, **kwargs)
        return record


@pytest.mark.parametrize("make_comm", COMMS)
def test_no_vocabulary_row_is_gathered_while_scoring(make_comm, tmp_path):
    path = write_random_model(tmp_path / "m", "llama-9h", vocab_size=259, max_position_embeddings=128)
    comm = RecordingComm(make_comm())
    model = Model.load(path, comm, "float64")
    chunks = chunk_tokens(np.random.default_rng(0).integers(0, 259, 100), 32, 3, None)
    scored = list(score_chunks(model, chunks, model.new_cache(32, 2)))
    assert [s.chunks for s in scored] == [range(0, 2), range(2, 3)]
    assert {name for name, _, _ in comm.calls} == {"Allreduce"}  # no Allgather, Gather, Bcast, Send ...
    assert all(max(shape) < 259 for _, shapes, _ in comm.calls for shape in shapes)  # no buffer spans the vocab
    assert sum(op == MPI.MAX for _, _, op in comm.calls) == 2  # the row maxima, once a batch
    serial = Model.load(path, mpi.serial(), "float64")
    logits = np.concatenate([serial.forward(c, serial.new_cache(32), all_logits=True)[None] for c in chunks])
    dense = log_softmax(logits)[:, 16:-1]
    expected = -np.take_along_axis(dense, chunks[:, 17:, None], axis=-1)[..., 0]
    assert np.abs(np.concatenate([s.nll for s in scored]) - expected).max() < 1e-12


# The command line, in subprocesses.

def run(args, n=1, timeout=300):
    cmd = [sys.executable, "-m", "mpitp.perplexity", *args]
    return subprocess.run((mpirun(n) if n > 1 else []) + cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(OPENBLAS_NUM_THREADS="1"), cwd=str(REPO))


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """A random Llama with 259 tokens (uneven over 2 and 3 ranks) and gpt2-tiny's byte tokenizer, which adds
    BOS: every chunk starts with it."""
    path = tmp_path_factory.mktemp("bos") / "llama-9h"
    write_random_model(path, "llama-9h", vocab_size=259, max_position_embeddings=128, bos_token_id=258)
    shutil.copy(model_dir("gpt2-tiny") + "/tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    return str(path)


def dense_perplexity(path, ctx, n_chunks, bos):
    """The oracle: the text tokenized by the tokenizers library itself, chunked, each chunk through the dense
    reference, a NumPy log-softmax of each whole row."""
    import tokenizers
    ids = tokenizers.Tokenizer.from_file(f"{path}/tokenizer.json").encode(TEXT.read_text()).ids
    ids = ([bos] if bos is not None else []) + ids
    nll = []
    for c in range(n_chunks):
        chunk = ids[c * ctx:(c + 1) * ctx]
        chunk[0] = chunk[0] if bos is None else bos
        dense = log_softmax(dense_logits(path, chunk))
        nll += [-dense[j, chunk[j + 1]] for j in range(ctx // 2, ctx - 1)]
    return float(np.exp(np.mean(nll))), len(nll)


@serial_only
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name", ["gpt2-tiny", "bos"])
def test_perplexity_equals_the_dense_reference(n, name, bos_model):
    path, bos = (model_dir(name), None) if name == "gpt2-tiny" else (bos_model, 258)
    r = run(["--model", path, "--file", str(TEXT), "--ctx", "33", "--chunks", "3", "--batch", "2",
             "--dtype", "float64", "--json"], n=n)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ppl, n_scored = dense_perplexity(path, 33, 3, bos)
    assert (out["n_chunks"], out["n_scored"], out["ranks"]) == (3, n_scored, n) and n_scored == 3 * 16
    assert abs(out["ppl"] / ppl - 1) < 1e-9
    running = r.stderr.strip().splitlines()[-1]  # llama-perplexity's running figures, the last the final PPL
    assert running.startswith("[1]") and running.endswith(f"[3]{out['ppl']:.4f},")


def read_base(path):
    """A base file read by its documented layout (docs/perplexity.md), not with mpitp's reader."""
    data = open(path, "rb").read()
    magic, version, length = struct.unpack_from("<8sII", data)
    header = json.loads(data[16:16 + length])
    offset = -(-(16 + length) // 64) * 64
    rows = np.frombuffer(data, np.dtype(header["dtype"]).newbyteorder("<"), offset=offset)
    return magic, version, header, rows.reshape(-1, header["n_vocab"])


@serial_only
def test_kl_divergence_base_written_on_three_ranks_compares_at_one_and_two(tmp_path, bos_model):
    base = str(tmp_path / "base.kld")
    common = ["--model", bos_model, "--file", str(TEXT), "--ctx", "33", "--chunks", "3", "--batch", "2"]
    written = run(common + ["--dtype", "float64", "--json", "--kl-divergence-base", base], n=3)
    assert written.returncode == 0, written.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.kld"]  # no .partial left
    magic, version, header, rows = read_base(base)
    assert (magic, version, header["ctx"], header["n_chunks"], header["n_scored"]) == (b"MPITPKLD", 1, 33, 3, 16)
    chunk = [258] + list(TEXT.read_bytes()[:32])  # the byte tokenizer: one token a byte, BOS first
    assert np.abs(rows[:16] - log_softmax(dense_logits(bos_model, chunk))[16:32]).max() < 1e-12
    for n, dtype, tol in ((1, "float64", 1e-12), (2, "float32", 1e-5)):
        r = run(common + ["--dtype", dtype, "--json", "--kl-divergence", base], n=n)
        assert r.returncode == 0, r.stderr
        out, ref = json.loads(r.stdout), json.loads(written.stdout)
        assert 0 <= out["kld"]["mean"] < tol and out["kld"]["max"] < 10 * tol and out["kld"]["same_top"] == 1.0
        assert abs(out["kld"]["base_ppl"] / ref["ppl"] - 1) < 1e-12 and abs(out["ppl"] / ref["ppl"] - 1) < tol
    text = run(common + ["--kl-divergence", base, "--quiet"], n=2)
    assert text.returncode == 0 and text.stderr == "" and text.stdout.splitlines()[0].startswith("PPL = ")
    assert [line.split(" = ")[0] for line in text.stdout.splitlines()] == ["PPL", "base PPL", "KLD", "same top"]


@serial_only
@pytest.mark.parametrize("n", [1, 2])
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, n, bos_model):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text(" \n")
    short.write_text("a few words")
    good = ["--model", model_dir("gpt2-tiny"), "--file", str(TEXT), "--chunks", "2", "--ctx", "32"]
    base = str(tmp_path / "base.kld")
    assert run(good + ["--kl-divergence-base", base, "--quiet"]).returncode == 0
    truncated = tmp_path / "truncated.kld"
    truncated.write_bytes(open(base, "rb").read()[:-8])
    no_tokenizer = write_random_model(tmp_path / "m", "gpt2-6h")
    cases = {
        "there is no tokenizer.json": ["--model", no_tokenizer, "--file", str(TEXT)],
        "is empty": ["--model", model_dir("gpt2-tiny"), "--file", str(empty)],
        "shorter than one chunk of --ctx 32": ["--model", model_dir("gpt2-tiny"), "--file", str(short), "--ctx", "32"],
        "more than the model's context of 128": ["--model", model_dir("gpt2-tiny"), "--file", str(TEXT), "--ctx",
                                                 "129"],
        "computed with another model": ["--model", model_dir("llama-gqa"), "--file", str(TEXT), "--chunks", "2",
                                        "--ctx", "32", "--kl-divergence", base],
        "computed with another --ctx: 32 where this run has 34": good[:-1] + ["34", "--kl-divergence", base],
        "computed with another text": ["--model", model_dir("gpt2-tiny"), "--file", str(bos_model) + "/config.json",
                                       "--chunks", "2", "--ctx", "32", "--kl-divergence", base],
        "truncated or damaged": good + ["--kl-divergence", str(truncated)],
        "not both": good + ["--kl-divergence", base, "--kl-divergence-base", base],
        "--kl-divergence-base": good + ["--kl-divergence-base", str(tmp_path / "no" / "such" / "dir" / "b.kld")],
    }
    for needle, args in cases.items():
        r = run(args + ["--quiet"], n=n)
        assert (r.returncode, r.stdout) == (2, ""), (needle, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and needle in r.stderr and r.stderr.startswith("mpitp: error: "), \
            (needle, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.kld", "empty.txt", "m", "short.txt",
                                                          "truncated.kld"]


STOP_IN_BASE = """
import os, signal, sys
from mpitp.cli import perplexity
from mpitp.tools.kldbase import BaseWriter
how, write = sys.argv.pop(1), BaseWriter.write

def write_then_stop(self, chunks, log_probs):
    write(self, chunks, log_probs)  # the partial file is there, a chunk in it
    if how != "stall":  # the signal the launcher forwards, handled by the main thread
        os.kill(os.getpid(), getattr(signal, how))
    open(f"{self.partial}.ready-{os.getpid()}", "w").close()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # stalled where no handler runs,
    os.read(os.pipe()[0], 1)  # as in a hung read: only the watchdog can end the rank

BaseWriter.write = write_then_stop
sys.exit(perplexity.main())
"""


@serial_only
@pytest.mark.parametrize("how, code", [("SIGINT", 130), ("SIGTERM", 143), ("stall", 143)])
def test_a_signal_while_the_base_is_written_leaves_no_partial_file(tmp_path, how, code):
    # Before: SIGINT or SIGTERM to mpirun ended the job with 130 or 143 and left base.kld.partial (hundreds of MB
    # for a real model). "stall": the main threads never run their handlers, SIGTERM to mpirun is the watchdog's.
    base = tmp_path / "base.kld"
    proc = subprocess.Popen([*mpirun(2), sys.executable, "-c", STOP_IN_BASE, how, "--model", model_dir("gpt2-tiny"),
                             "--file", str(TEXT), "--ctx", "32", "--batch", "1", "--kl-divergence-base", str(base)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=str(REPO), start_new_session=True)
    try:
        if how == "stall":
            for _ in range(1200):  # both ranks stalled after a write (at most 120 s on a busy machine)
                if len(list(tmp_path.glob("*.ready-*"))) == 2 or proc.poll() is not None:
                    break
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code and stdout == "", (proc.returncode, stderr)
    assert [p.name for p in tmp_path.iterdir() if ".ready-" not in p.name] == []


@serial_only
@pytest.mark.parametrize("args", [[], ["--json"]])
def test_a_result_that_cannot_be_written_is_an_error(args):
    # Before: with stdout closed (>&-) the result was lost and the status was 0; on /dev/full "unexpected error",
    # status 1. A closed stdout is refused before any work.
    cmd = [sys.executable, "-m", "mpitp.perplexity", "--model", model_dir("gpt2-tiny"), "--file", str(TEXT),
           "--ctx", "32", "--chunks", "2", "--quiet", *args]
    closed, full, gone = unwritable_stdout(cmd)
    assert [(r.returncode, r.stderr) for r in (closed, full, gone)] == [(2, "mpitp: " + CLOSED), (2, "mpitp: " + FULL),
                                                                       (141, "")]
