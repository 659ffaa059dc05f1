"""--comm-dtype: the wire formats against independent encodings of their documented byte layouts, the reduce-scatter
and all-gather of encoded blocks on simulated ranks, the model with its block's reductions on the wire, and the
command line's refusals."""

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, child_env, model_dir, mpirun, run_cli, serial_only
from faults_util import one_error_line
from test_faults_ranks import PROMPT, mpmd
from random_models import write_random_model
from threadcomm import run_ranks
from mpitp import comm as mpi
from mpitp.comm import TimedComm, sent_bytes, wire_allreduce
from mpitp.errors import MpitpError
from mpitp.generation import generate_batch
from mpitp.model import Model
from mpitp.wire import FORMATS

pytestmark = serial_only


def sample(n, dtype, seed=0):
    """Values like a block's partial sums: mostly small, some large outliers, exact zeros, halves of a scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * rng.choice([1e-3, 1.0, 30.0], n, p=[0.2, 0.75, 0.05])
    x[rng.integers(0, n, n // 16)] = 0.0
    if n > 40:
        x[32:64] = np.arange(32) * 0.5  # a block whose values sit on halves of d once scaled: rounding ties
    return x.astype(dtype)


# The oracles: one value or one block at a time, with struct and math, from the layouts in mpitp/wire.py's docstring.

def bf16_oracle(v):
    """The nearest bfloat16 to float ``v`` (ties to the even pattern), as its 16 bits: of |v|'s neighbours."""
    sign, m = (0x8000 if math.copysign(1, v) < 0 else 0), abs(v)
    bits = struct.unpack("<I", struct.pack("<f", np.float32(m)))[0] >> 16  # a truncation near |v| (in float32)
    cands = [(b, struct.unpack("<f", struct.pack("<I", b << 16))[0]) for b in {max(bits - 1, 0), bits, bits + 1}]
    best = min(abs(c - m) for _, c in cands)
    tied = sorted(b for b, c in cands if abs(c - m) == best)
    return sign | ([b for b in tied if b % 2 == 0][0] if len(tied) > 1 else tied[0])


def roundf(v):
    return math.copysign(math.floor(abs(v) + 0.5), v)


def q8_oracle(x, outlier):
    """The bytes of x in blocks of 32 (zeros padding the tail): Q8_0, or with ``outlier`` Q8_0 with its largest value
    apart (float16 scale, float16 value, uint8 index, 32 int8)."""
    out = b""
    x = list(map(float, x)) + [0.0] * (-len(x) % 32)
    for s in range(0, len(x), 32):
        block = x[s:s + 32]
        i = max(range(32), key=lambda j: (abs(block[j]), -j)) if outlier else None
        rest = [0.0 if j == i else v for j, v in enumerate(block)]
        d = max(abs(v) for v in rest) / 127
        qs = [int(roundf(v / d)) if d else 0 for v in rest]
        head = struct.pack("<ee", d, block[i]) + bytes([i]) if outlier else struct.pack("<e", d)
        out += head + struct.pack("<32b", *qs)
    return out


def oracle_encode(name, x):
    if name in ("float64", "float32", "float16"):
        kind = {"float64": "d", "float32": "f", "float16": "e"}[name]
        return struct.pack(f"<{len(x)}{kind}", *map(float, x))
    if name == "bfloat16":
        return struct.pack(f"<{len(x)}H", *[bf16_oracle(float(v)) for v in x])
    return q8_oracle(x, name == "q8_0o")


def oracle_decode(name, data, n):
    if name in ("float64", "float32", "float16"):
        kind = {"float64": "d", "float32": "f", "float16": "e"}[name]
        return list(struct.unpack(f"<{n}{kind}", data))
    if name == "bfloat16":
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack(f"<{n}H", data)]
    size, values = (37 if name == "q8_0o" else 34), []
    for s in range(0, len(data), size):
        b = data[s:s + size]
        if name == "q8_0o":
            d, o, i, qs = *struct.unpack("<ee", b[:4]), b[4], struct.unpack("<32b", b[5:])
            values += [o if j == i else q * d for j, q in enumerate(qs)]
        else:
            d = struct.unpack("<e", b[:2])[0]
            values += [q * d for q in struct.unpack("<32b", b[2:])]
    return values[:n]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 31, 32, 100, 576])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_formats_match_their_documented_byte_layout(name, n, dtype):
    fmt, x = FORMATS[name], sample(n, dtype, seed=n)
    data = fmt.encode(x)
    expected = oracle_encode(name, x)
    assert data.dtype == np.uint8 and data.tobytes() == expected and len(expected) == fmt.n_bytes(n)
    back = fmt.decode(data, n, np.dtype(dtype))
    assert back.dtype == np.dtype(dtype)
    assert back.tolist() == np.array(oracle_decode(name, expected, n), dtype).tolist()


def test_formats_error_is_their_precision():
    x = sample(32 * 64, np.float64)
    err = {name: np.abs(f.decode(f.encode(x), x.size, np.float64) - x) for name, f in FORMATS.items()}
    assert err["float64"].max() == 0 and err["float32"].max() <= 2 ** -24 * np.abs(x).max()
    assert np.all(err["bfloat16"] <= 2 ** -8 * np.abs(x)) and np.all(err["float16"] <= 2 ** -11 * np.abs(x) + 2 ** -25)
    blocks = x.reshape(-1, 32)
    q8 = err["q8_0"].reshape(-1, 32)  # half a step of the scale d, plus |q| <= 127 times d's float16 rounding
    assert np.all(q8 <= np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2 ** -11) + 1e-12)
    # the outlier kept apart: its block's other values are quantized on their own, smaller scale
    assert err["q8_0o"].mean() < 0.5 * err["q8_0"].mean()


def test_bfloat16_of_float64_is_rounded_once():
    # halfway between two bfloat16 in float32, but a hair above it in float64: float64 -> float32 -> bfloat16
    # would round down (ties to even), the one rounding rounds up
    lo = 1.0
    half = lo + 2 ** -8  # the midpoint between 1.0 and its bfloat16 successor 1 + 2**-7
    x = np.array([half + 2 ** -40, half, -half - 2 ** -40])
    bits = FORMATS["bfloat16"].encode(x).view("<u2")
    assert bits.tolist() == [bf16_oracle(v) for v in x.tolist()] == [0x3F81, 0x3F80, 0xBF81]


@pytest.mark.parametrize("size", [2, 3, 4, 8])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_wire_allreduce_on_simulated_ranks(name, size):
    fmt = FORMATS[name]
    parts = [sample(3 * 70, np.float32, seed=r).reshape(3, 70) for r in range(size)]

    def rank(comm):
        buf = parts[comm.Get_rank()].copy()
        return buf, wire_allreduce(comm, buf, fmt)

    results = run_ranks(size, rank)
    for buf, _ in results:  # bit-identical on every rank
        assert buf.tobytes() == results[0][0].tobytes()
    # The oracle, row by row: the row padded with zeros to whole blocks; block b of it belongs to the rank whose
    # segment of the row's blocks holds it; that rank sums, in rank order, its own part as it is and the others'
    # as decoded by the oracle; the sum is encoded once and decoded by everyone.
    n_col = -(-70 // fmt.block)
    expected = np.empty((3, n_col * fmt.block), np.float32)
    for i in range(3):
        row = [np.pad(p[i], (0, n_col * fmt.block - 70)) for p in parts]
        for owner, (start, count) in enumerate(mpi.segments(n_col, size)):
            lo, hi = start * fmt.block, (start + count) * fmt.block
            total = None
            for r in range(size):
                part = row[r][lo:hi] if r == owner else np.array(
                    oracle_decode(name, oracle_encode(name, row[r][lo:hi]), hi - lo), np.float32)
                total = part.copy() if total is None else total + part
            expected[i, lo:hi] = oracle_decode(name, oracle_encode(name, total), hi - lo)
    assert results[0][0].tolist() == expected[:, :70].tolist()
    exact = np.sum(np.array(parts, np.float64), axis=0)
    assert np.abs(results[0][0] - exact).max() <= {"float64": 1e-5, "float32": 1e-5}.get(name, 1.0)
    sent = [s for _, s in results]
    assert sent == [sent_bytes(n_col, fmt.block_bytes, size, r, 3) for r in range(size)]
    whole = 3 * fmt.n_bytes(70)  # about 2 (P - 1) / P of the encoded buffer: per row at most P - 2 blocks off
    assert all(abs(s - 2 * (size - 1) / size * whole) <= 3 * (size - 2) * fmt.block_bytes for s in sent)


def forward_on(size, name, comm_dtype, dtype="float32", timed=False):
    """Logits of a prompt on ``size`` simulated ranks with the block's reductions in ``comm_dtype``, and each rank's
    (calls, payload bytes, sent bytes) if ``timed``."""
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6])

    def rank(comm):
        tc = TimedComm(comm) if timed else comm
        model = Model.load(model_dir(name), tc, dtype, comm_dtype=comm_dtype)
        logits = model.forward(ids, model.new_cache(len(ids)), all_logits=True)
        return logits, (tc.calls, tc.bytes, tc.sent) if timed else None

    return run_ranks(size, rank)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_model_with_its_block_reductions_on_the_wire(name):
    plain = forward_on(2, name, None)[0][0]
    assert forward_on(2, name, "float32")[0][0].tobytes() == plain.tobytes()  # the model's dtype: the seed's path
    # float64 on the wire carries float32 partial sums exactly; two of them summed in float32: the same bits
    assert forward_on(2, name, "float64")[0][0].tobytes() == plain.tobytes()
    reference = forward_on(1, name, None, "float64")[0][0]
    errors = {}
    for fmt in ("float16", "bfloat16", "q8_0", "q8_0o"):
        runs = forward_on(4, name, fmt, timed=True)
        assert all(r[0].tobytes() == runs[0][0].tobytes() for r in runs)  # every rank: the same logits
        errors[fmt] = np.abs(runs[0][0] - reference).max()
        assert errors[fmt] > 0  # the wire's rounding is there...
    assert errors["float16"] < errors["bfloat16"] < 0.1  # ...and as large as the format's precision
    assert errors["q8_0o"] < 0.1 and errors["q8_0"] < 0.3
    # a one-rank model sends nothing: the wire format changes nothing there
    assert forward_on(1, name, "q8_0")[0][0].tobytes() == forward_on(1, name, None)[0][0].tobytes()


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("name", ["q8_0", "q8_0o", "bfloat16", "float16"])
def test_a_row_s_sum_on_the_wire_does_not_depend_on_the_rows_beside_it(name, size):
    # Rows 72 wide (llama-9h's), not whole blocks of 32. Before, the blocks ran on across rows and a rank's segment
    # was cut from the whole buffer (so which rank's part stayed unrounded depended on the rows beside it, in every
    # format), and a batch's sequence could get other tokens than alone (found by a fresh-eyes attack). Each row is
    # padded to whole blocks now, as GGML's rows are, and a rank owns the same blocks of every row.
    fmt = FORMATS[name]
    parts = [sample(3 * 72, np.float32, seed=r).reshape(3, 72) for r in range(size)]

    def rank(comm):
        rows = parts[comm.Get_rank()].copy()
        wire_allreduce(comm, rows, fmt)
        alone = [parts[comm.Get_rank()][i:i + 1].copy() for i in range(3)]
        for row in alone:
            wire_allreduce(comm, row, fmt)
        return rows, np.concatenate(alone)

    for rows, alone in run_ranks(size, rank):
        assert rows.tobytes() == alone.tobytes()


def test_rows_narrower_than_a_block_are_summed_exactly():
    # OLMoE's QK-norm sums inside a block are [n_rows, 2]: padded to a block of 32 each they would cost 34 bytes a
    # row in q8_0 against 8 raw, and be rounded for nothing. They take the plain Allreduce.
    from mpi4py import MPI
    parts = [sample(6, np.float32, seed=r).reshape(3, 2) for r in range(2)]

    def rank(comm):
        wire, buf = mpi.WireComm(comm, FORMATS["q8_0"]), parts[comm.Get_rank()].copy()
        wire.during(lambda: wire.Allreduce(MPI.IN_PLACE, buf))()
        return buf

    assert all(buf.tolist() == (parts[0] + parts[1]).tolist() for buf in run_ranks(2, rank))


@pytest.mark.parametrize("size", [2, 3])
def test_a_sequence_in_a_batch_gets_its_alone_tokens_on_every_wire(tmp_path, size):
    # The attack's case: the third prompt, in a batch of three, got other tokens than alone on q8_0 (from its 4th)
    path = write_random_model(tmp_path / "m", "llama-9h", num_hidden_layers=4)
    prompts = [[12], [1, 2], [3]]

    def rank(comm):
        out = {}
        for name in ("bfloat16", "q8_0", "q8_0o"):
            model = Model.load(path, comm, "float64", comm_dtype=name)
            out[name] = ([r.token_ids for r in generate_batch(model, prompts, 12)],
                         [generate_batch(model, [p], 12)[0].token_ids for p in prompts])
        return out

    for out in run_ranks(size, rank):
        assert all(batch == alone for batch, alone in out.values()), out


def test_bytes_sent_per_wire_format():
    sent, calls, payload = {}, set(), set()
    for fmt in ("float32", "bfloat16", "q8_0", "q8_0o"):
        runs = forward_on(2, "gpt2-tiny", fmt, timed=True)
        sent[fmt] = runs[0][1][2]
        calls.add(runs[0][1][0])
        payload.add(runs[0][1][1])
    assert len(calls) == 1 and len(payload) == 1  # the same calls and payload; only what crosses the wire shrinks
    # gpt2-tiny: 2 blocks of width 64, 8 rows; at 2 ranks each sends 2 (P - 1) / P = 1 times the encoded buffer
    # per call; the embedding's reduction stays float32
    n_layer, n_embd, rows = 2, 64, 8
    embed = rows * n_embd * 4
    assert sent["float32"] == embed + 2 * n_layer * rows * n_embd * 4
    assert sent["bfloat16"] == embed + 2 * n_layer * rows * n_embd * 2
    assert sent["q8_0"] == embed + 2 * n_layer * rows * n_embd // 32 * 34
    assert sent["q8_0o"] == embed + 2 * n_layer * rows * n_embd // 32 * 37


def test_unknown_comm_dtype_is_refused_in_one_line():
    r = run_cli(["--comm-dtype", "int8", "--prompt-ids", "1,2", "--max-new-tokens", "2"])
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert "--comm-dtype" in lines[-1] and "int8" in lines[-1] and "q8_0o" in lines[-1] and "Traceback" not in r.stderr


@pytest.mark.parametrize("module", ["mpitp.generate", "mpitp.perplexity"])
def test_ranks_given_different_comm_dtypes_refuse_together(module, tmp_path):
    if module == "mpitp.generate":
        a = PROMPT
    else:
        (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
        a = ["--model", model_dir("llama-gqa"), "--file", str(tmp_path / "t.txt"), "--ctx", "16"]
    r = mpmd(a + ["--comm-dtype", "q8_0"], a + ["--comm-dtype", "bfloat16"], module)
    one_error_line(r, "rank 1 differs from rank 0 in its --comm-dtype: bfloat16 against q8_0")
    assert r.stdout == ""


def test_an_unknown_wire_format_is_refused_before_loading(tmp_path):
    with pytest.raises(MpitpError, match=r"--comm-dtype 'int4' is not a wire format; use one of: .*q8_0o"):
        Model.load(str(tmp_path / "no-such-model"), mpi.serial(), comm_dtype="int4")  # before the folder is read


def test_generate_json_counts_the_bytes_it_sent():
    out = {}
    for fmt in ("float32", "q8_0o"):
        r = run_cli(["--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json", "--comm-dtype", fmt], n=2)
        assert r.returncode == 0, r.stderr
        out[fmt] = json.loads(r.stdout)
    assert out["q8_0o"]["comm_dtype"] == "q8_0o" and out["float32"]["comm_dtype"] == "float32"
    b32, b8 = out["float32"]["timing"]["allreduce_bytes"], out["q8_0o"]["timing"]["allreduce_bytes"]
    assert 0 < b8 < 0.5 * b32


def test_perplexity_on_the_wire(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    out = {}
    for fmt in ("float32", "q8_0o"):
        r = subprocess.run(mpirun(2) + [sys.executable, "-m", "mpitp.perplexity", "--model", model_dir("llama-gqa"),
                                        "--file", str(text), "--ctx", "16", "--json", "--comm-dtype", fmt],
                           capture_output=True, text=True, timeout=120, env=child_env(), cwd=str(REPO))
        assert r.returncode == 0, r.stderr
        out[fmt] = json.loads(r.stdout)
    assert out["q8_0o"]["comm_dtype"] == "q8_0o" and out["float32"]["comm_dtype"] == "float32"
    assert out["q8_0o"]["ppl"] != out["float32"]["ppl"]
    assert out["q8_0o"]["ppl"] == pytest.approx(out["float32"]["ppl"], rel=0.05)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
