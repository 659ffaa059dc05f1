"""``python -m mpitp.compare`` and ``python -m mpitp.hftrace``: traces of any rank counts compared tensor by tensor.

Traces are written by mpitp itself on simulated ranks (threads, tests/threadcomm.py), at 1 to 4 ranks, for the two
golden models and a random SmolLM2-like layout (9 query heads, 3 key/value heads: most rank counts cut a group).
The oracles are independent of compare's own bookkeeping: where a perturbed element sits in the full tensor, and
which ranks hold it, is found by matching its column's values against the 1-rank trace and every rank's file;
Hugging Face's logits are checked against the goldens of tests/data.
"""

import contextlib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CLOSED, FULL, child_env, golden, model_dir, run_cli, serial_only, unwritable_stdout, REPO
from mpitp import Trace, compare, generate_batch, load_model
from random_models import write_random_model
from threadcomm import run_ranks

PROMPTS = ((1, 2, 3, 4, 5), (6, 7, 8))  # two prompts: step 0 stacks 8 rows, each decode step 2
MODELS = ("llama-gqa", "gpt2-tiny", "llama-9h")
D_HEAD = {"llama-gqa": 8, "gpt2-tiny": 16, "llama-9h": 8}  # head_dim, or hidden size / heads, of each config.json
N_TENSORS = 3 * (2 * 8 + 1)  # 3 steps of 2 layers of A..E, and each step's logits
HF = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HF, reason="needs torch and transformers: the 'hf' extra (pip install -e '.[hf]')")


def write_trace(folder, path, size, dtype="float64", prompts=PROMPTS, max_new_tokens=3):
    """mpitp's trace of greedy generation (no stop at end-of-sequence) on ``size`` simulated ranks."""
    folder.mkdir(parents=True)

    def rank(comm):
        trace = Trace(path)
        generate_batch(load_model(path, comm, dtype), [list(p) for p in prompts], max_new_tokens, trace=trace)
        trace.save(folder / f"rank{comm.Get_rank()}.npz")
    run_ranks(size, rank)
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    random = write_random_model(tmp_path_factory.mktemp("models") / "llama-9h", "llama-9h")
    return {"llama-gqa": model_dir("llama-gqa"), "gpt2-tiny": model_dir("gpt2-tiny"), "llama-9h": random}


@pytest.fixture(scope="module")
def traces(paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    return {(m, p): write_trace(root / f"{m}-p{p}", paths[m], p) for m in MODELS for p in range(1, 5)}


def run_compare(*args):
    """``python -m mpitp.compare ARGS`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def edit(src, dst, change, ranks=None):
    """Copy trace ``src`` to ``dst``, then ``change(arrays)`` of the files of ``ranks`` (default: every one)."""
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("rank*.npz")):
        if ranks is None or int(f.stem[4:]) in ranks:
            arrays = dict(np.load(f, allow_pickle=False))
            change(arrays)
            np.savez(f, **arrays)
    return dst


def first_divergence(stdout):
    (line,) = [x for x in stdout.splitlines() if x.startswith("first divergence:")]
    return line


# --- traces of every rank count agree ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_every_rank_count_compares_clean(traces, model):
    for p in range(1, 5):
        for q in range(p, 5):
            code, out, err = run_compare(traces[model, p], traces[model, q])
            assert (code, err) == (0, ""), out + err
            assert "rtol 1e-05, atol 1e-05 (the float64 defaults; REF is float64, OTHER float64)" in out
            assert f"within tolerance: all {N_TENSORS} tensors of 3 step(s)" in out and _marked(out) == []
            # mpitp is float64 throughout: its rank counts agree far closer than the default tolerance
            assert run_compare(traces[model, p], traces[model, q], "--rtol", "1e-11", "--atol", "1e-11")[0] == 0


def _table(stdout):
    lines = stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.split()[:2] == ["step", "layer"])
    return [x.split() for x in lines[start + 1:] if x[:1] == " " or x[:1].isdigit()]


def _marked(stdout):
    """(step, layer, tensor) of the table's cells marked out of tolerance."""
    header = next(x.split() for x in stdout.splitlines() if x.split()[:2] == ["step", "layer"])
    return [(r[0], r[1], header[i]) for r in _table(stdout) for i, cell in enumerate(r) if cell.endswith("*")]


def test_the_table_has_a_row_per_step_and_layer_and_marks_the_tensor_out_of_tolerance(traces, tmp_path):
    bad = edit(traces["llama-gqa", 2], tmp_path / "bad", lambda a: a["step1/layer0/D"].__setitem__((1, 7), 9.0),
               ranks={0})
    code, out, _ = run_compare(traces["llama-gqa", 3], bad)
    assert code == 1 and [r[:2] for r in _table(out)] == [[str(s), str(l)] for s in range(3) for l in range(2)]
    assert next(x.split() for x in out.splitlines() if x.startswith("step")) == ["step", "layer", *"AQKVBCDE",
                                                                                   "logits"]
    assert _marked(out) == [("1", "0", "D")]
    assert "out of tolerance: 1 element(s) in 1 of 51 tensors" in out
    # --summary: the same verdict and first divergence, a line per step instead of the table
    code, summary, _ = run_compare(traces["llama-gqa", 3], bad, "--summary")
    steps = [x for x in summary.splitlines() if x.startswith("step ")]
    assert code == 1 and "step  layer" not in summary and [x.split(":")[0] for x in steps] == ["step 0", "step 1",
                                                                                              "step 2"]
    assert steps[1].startswith("step 1: 1 of 17 tensors out of tolerance; the largest difference ")
    assert "(step1/layer0/D); the closest to the tolerance step1/layer0/D, at " in steps[1]
    assert all(x.startswith(f"step {s}: 0 of 17 tensors out of tolerance") for s, x in ((0, steps[0]), (2, steps[2])))
    assert summary.splitlines()[-2:] == out.splitlines()[-2:]


# --- a single perturbed element, anywhere, is found and located --------------------------------------------------

def _holders(folder, key, column_values):
    """The ranks whose file holds a column equal to ``column_values`` (an independent oracle of ownership)."""
    ranks = []
    for f in sorted(folder.glob("rank*.npz"), key=lambda f: int(f.stem[4:])):
        part = np.load(f)[key]
        if np.abs(part - column_values[:, None]).max(axis=0).min() < 1e-9:
            ranks.append(int(f.stem[4:]))
    return ranks


def _parse_ranks(text):
    m = re.fullmatch(r"every rank \(0\.\.(\d+)\)", text)
    if m:
        return list(range(int(m.group(1)) + 1))
    m = re.fullmatch(r"ranks? ([\d, ]+?)(?: and (\d+))? of \d+", text)
    return [int(x) for x in m.group(1).split(", ")] + ([int(m.group(2))] if m.group(2) else [])


@pytest.mark.timeout(900)  # 200 runs of compare: minutes on a machine that other jobs keep busy, not a hang
@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_a_single_perturbed_element_is_detected_and_located(traces, data):
    model = data.draw(st.sampled_from(MODELS), "model")
    p_bad, p_good = data.draw(st.integers(1, 4), "ranks of the perturbed trace"), data.draw(st.integers(1, 4))
    bad_is_ref = data.draw(st.booleans(), "the perturbed trace is REF")
    rank = data.draw(st.integers(0, p_bad - 1), "rank")
    src = traces[model, p_bad]
    original = np.load(src / f"rank{rank}.npz")
    key = data.draw(st.sampled_from(sorted(k for k in original.files if re.fullmatch(r"step\d+/(layer\d+/.|logits)",
                                                                                       k))), "key")
    part = original[key]
    row, col = data.draw(st.integers(0, part.shape[0] - 1), "row"), data.draw(st.integers(0, part.shape[1] - 1))
    how = data.draw(st.sampled_from(["add", "add", "add", "nan", "inf"]), "perturbation")
    size = 10.0 ** data.draw(st.floats(-4, 3), "log10 size") * data.draw(st.sampled_from([-1, 1]))
    value = part[row, col] + size * (1 + abs(part[row, col])) if how == "add" else float(how)

    with tempfile.TemporaryDirectory() as tmp:
        bad = edit(src, Path(tmp) / "bad", lambda a: a[key].__setitem__((row, col), value),
                   ranks={rank})
        good = traces[model, p_good]
        code, out, err = run_compare(*((bad, good) if bad_is_ref else (good, bad)))
    assert code == 1 and err == "", out + err
    assert f"out of tolerance: 1 element(s) in 1 of {N_TENSORS} tensors" in out
    line = first_divergence(out)

    # Where the element is in the full tensor: the column of the 1-rank trace that holds the same values.
    full = np.load(traces[model, 1] / "rank0.npz")[key]
    distance = np.abs(full - part[:, col][:, None]).max(axis=0)
    column = int(np.argmin(distance))
    assert distance[column] < 1e-9 and np.sort(distance)[1:2].min(initial=1.0) > 1e-9
    step, name = int(key[4:key.index("/")]), key.rsplit("/", 1)[1]
    what = {"Q": f"query head {column // D_HEAD[model]} ", "B": f"query head {column // D_HEAD[model]} ",
            "K": f"key/value head {column // D_HEAD[model]} ", "V": f"key/value head {column // D_HEAD[model]} ",
            "D": f"MLP column {column}:", "logits": f"vocabulary id {column}:"}.get(name, f"column {column}:")
    tensor = "logits" if name == "logits" else f"layer {int(key.split('/')[1][5:])}, tensor {name}"
    assert line.startswith(f"first divergence: step {step}, {tensor}, row {row} "), line
    assert f", {what}" in line and (name not in "QKVB" or f"column {column})" in line), line
    label = "REF" if bad_is_ref else "OTHER"
    assert f"{label} {np.float64(value)}, " in line, line  # the perturbed value, as the trace holds it

    # Which ranks hold it, in each trace, and which copy differs when the perturbed trace holds several.
    m = re.search(r"held by (.+?) in REF(?: \(the copy on (.+?) differs\))? and (.+?) in OTHER(?: \(the copy on "
                  r"(.+) differs\))?$", line)
    assert m, line
    held = {"REF": _parse_ranks(m.group(1)), "OTHER": _parse_ranks(m.group(3))}
    odd = {"REF": m.group(2), "OTHER": m.group(4)}
    expected_bad, expected_good = _holders(src, key, part[:, col]), _holders(good, key, part[:, col])
    assert rank in expected_bad
    other_label = "OTHER" if bad_is_ref else "REF"
    assert (held[label], held[other_label]) == (expected_bad, expected_good), line
    assert odd[other_label] is None and odd[label] == (f"rank {rank}" if len(expected_bad) > 1 else None), line


# --- refusals: one line, exit status 2 ---------------------------------------------------------------------------

def _refused(result, expected):
    code, out, err = result
    assert code == 2 and out == "", out + err
    assert err.count("\n") == 1 and err.startswith("mpitp.compare: error: ") and "Traceback" not in err, err
    assert expected in err, err


def test_different_prompts_are_refused(traces, paths, tmp_path):
    ref = traces["llama-gqa", 2]
    other = write_trace(tmp_path / "other", paths["llama-gqa"], 3, prompts=((1, 2, 3, 4, 5), (6, 7, 9)))
    _refused(run_compare(ref, other), "REF and OTHER have different prompts: prompt 1 has token 8 at position 2 in "
                                      "REF and 9 in OTHER; compare traces of the same prompt ids.")
    one = write_trace(tmp_path / "one", paths["llama-gqa"], 1, prompts=PROMPTS[:1])
    _refused(run_compare(ref, one), "REF has 2 prompt(s) and OTHER 1")


def test_different_models_are_refused(traces, tmp_path):
    _refused(run_compare(traces["gpt2-tiny", 2], traces["llama-gqa", 2]),
             "REF and OTHER are traces of different models: their config.json files differ")
    # Without the model's identity the shapes tell: llama-9h has 72 columns where llama-gqa has 64.
    strip = lambda a: a.pop("meta/config_sha256")  # noqa: E731
    a, b = edit(traces["llama-9h", 3], tmp_path / "a", strip), edit(traces["llama-gqa", 2], tmp_path / "b", strip)
    _refused(run_compare(a, b), f"shape mismatch: step0/layer0/A is [8, 72] in REF {a} and [8, 64] in OTHER {b}")


def test_missing_keys_are_refused(traces, tmp_path):
    ref, src = traces["llama-gqa", 2], traces["llama-gqa", 3]
    drop = edit(src, tmp_path / "everywhere", lambda a: a.pop("step1/layer1/D"))
    _refused(run_compare(ref, drop), f"{drop / 'rank0.npz'} has no key 'step1/layer1/D' (the trace has 3 steps")
    one = edit(src, tmp_path / "one-rank", lambda a: a.pop("step1/layer1/D"), ranks={1})
    _refused(run_compare(ref, one), f"{one / 'rank1.npz'} has no key 'step1/layer1/D', which rank0.npz has")
    no_d = edit(src, tmp_path / "no-D", lambda a: [a.pop(k) for k in list(a) if k.endswith("/D")])
    _refused(run_compare(ref, no_d), f"OTHER {no_d} has no step0/layer0/D (REF has it): compare fewer tensors with "
                                     f"--tensors (e.g. --tensors A,Q,K,V,B,C,E,logits)")
    code, out, _ = run_compare(ref, no_d, "--tensors", "A,Q,K,V,B,C,E,logits")
    assert code == 0 and f"all {3 * (2 * 7 + 1)} tensors" in out
    no_version = edit(src, tmp_path / "no-version", lambda a: a.pop("format/version"))
    _refused(run_compare(ref, no_version), f"{no_version / 'rank0.npz'} has no key 'format/version'")


def test_a_different_number_of_steps_is_refused_unless_limited(traces, paths, tmp_path):
    short = write_trace(tmp_path / "short", paths["gpt2-tiny"], 3, max_new_tokens=2)
    _refused(run_compare(traces["gpt2-tiny", 2], short), "has 3 steps and OTHER")
    code, out, _ = run_compare(traces["gpt2-tiny", 2], short, "--steps", "2")
    assert code == 0 and f"all {2 * 17} tensors of 2 step(s)" in out
    _refused(run_compare(traces["gpt2-tiny", 2], short, "--steps", "3"), "--steps 3: REF has 3 steps and OTHER 2; "
                                                                         "give 1 to 2.")


def _set(key, value, index=None):
    """A change for ``edit``: ``key`` becomes ``value``, or its element ``index`` does."""
    def change(a):
        if index is None:
            a[key] = np.asarray(value)
        else:
            a[key][index] = value
    return change


@pytest.mark.parametrize("case, expected", [
    ("not-a-folder", "OTHER {other}: not a folder"),
    ("empty", "OTHER {other}: no rank{{r}}.npz files"),
    ("missing-rank", "OTHER {other}: rank1.npz is missing (there is rank2.npz)"),
    ("garbage", "{other}/rank0.npz: not a NumPy .npz archive"),
    ("version", "{other}/rank1.npz: format/version is 2; this compare reads version 1"),
    ("gap", "OTHER {other}: the ranks' shard/head_start and shard/n_head_local do not tile the model: query heads "
            "3..3 are on no rank."),
    ("overlap", "OTHER {other}: the ranks' shard/ffn_start and shard/n_ffn_local do not tile the model: MLP columns "
                "59..59 are on two ranks (rank0.npz and rank1.npz)."),
    ("width", "{other}/rank1.npz: step0/layer1/Q is [8, 16], expected [8, 24] (shard/n_head_local x shard/d_head "
              "columns), a row per token of step0/tokens."),
    ("rank", "{other}/rank0.npz: shard/rank is 2 and shard/size 3, but the file is rank0.npz of 3"),
    ("shard-type", "{other}/rank2.npz: 'shard/vocab_start' must be an integer scalar, got float64 of shape []."),
    ("tensors", "--tensors A,F: F is not a tensor name"),
    ("rtol", "--rtol -1.0: a tolerance is a finite number >= 0."),
])
def test_bad_input_is_one_line_and_status_2(traces, tmp_path, case, expected):
    src, other, extra = traces["llama-gqa", 3], tmp_path / "other", []
    if case == "not-a-folder":
        other.write_text("")
    elif case == "empty":
        other.mkdir()
    elif case == "missing-rank":
        shutil.copytree(src, other)
        (other / "rank1.npz").unlink()
    elif case == "garbage":
        shutil.copytree(src, other)
        (other / "rank0.npz").write_text("not a zip")
    elif case == "version":
        edit(src, other, _set("format/version", np.int64(2)), ranks={1})
    elif case == "gap":
        edit(src, other, _set("shard/head_start", np.int64(4)), ranks={1})
    elif case == "overlap":
        edit(src, other, _set("shard/n_ffn_local", np.int64(60)), ranks={0})
    elif case == "width":
        edit(src, other, lambda a: a.__setitem__("step0/layer1/Q", a["step0/layer1/Q"][:, :16]), ranks={1})
    elif case == "rank":
        edit(src, other, _set("shard/rank", np.int64(2)), ranks={0})
    elif case == "shard-type":
        edit(src, other, _set("shard/vocab_start", np.float64(172)), ranks={2})
    else:
        shutil.copytree(src, other)
        extra = ["--tensors", "A,F"] if case == "tensors" else ["--rtol", "-1"]
    _refused(run_compare(traces["llama-gqa", 2], other, *extra), expected.format(other=other))


def _npy_header_claiming(shape):
    """A .npy member of float64 ``shape`` by its header, with 64 bytes of data after it."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64)


def _replace_member(path, name, data):
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(path, "w") as z:
        for k, v in {**members, name: data}.items():
            z.writestr(k, v)


@pytest.mark.parametrize("case, expected", [
    ("zero-rows", "step0/layer0/A is [0, 64]; a tensor has a row per token the forward consumed (at least one)"),
    ("zero-tokens", "step0/tokens must be integers [rows, 2] (token id, position) with rows >= 1, got int64 [0, 2]"),
    ("32-TiB-header", "key 'step0/layer1/C' is float64 of shape [549755813888, 8] (35184372088832 bytes) by its "
                      "header, but holds 64 bytes; the file is corrupt."),
    ("layer-100000000", "has no key 'step0/layer2/A' (the trace has 3 steps and 100000001 layers"),
    ("objects", "key 'extra/objects' holds Python objects"),
    ("no-vocab", "no rank holds any vocabulary ids (every shard/n_vocab_local is 0)"),
], ids=["zero-rows", "zero-tokens", "32-TiB-header", "layer-100000000", "objects", "no-vocab"])
def test_broken_traces_are_bad_input_not_a_divergence(traces, tmp_path, case, expected):
    # Each was exit 1, "diverged" (issue 21): a ValueError of a zero-size array, a MemoryError for 32 TiB, a walk
    # over 10^8 layers then a MemoryError. Exit 1 must mean a divergence; these are exit 2, before any allocation.
    src, other = traces["llama-gqa", 2], tmp_path / "other"
    if case == "zero-rows":  # both traces alike, as the attack had them
        edit(src, other, lambda a: [a.__setitem__(k, v[:0]) for k, v in list(a.items()) if k.startswith("step")
                                    and not k.endswith("tokens")] + [a.pop(k) for k in list(a) if k.endswith("tokens")])
    elif case == "zero-tokens":
        edit(src, other, lambda a: a.__setitem__("step0/tokens", a["step0/tokens"][:0]))
    elif case == "32-TiB-header":
        shutil.copytree(src, other)
        _replace_member(other / "rank1.npz", "step0/layer1/C.npy", _npy_header_claiming((2**45 // 64, 8)))
    elif case == "layer-100000000":
        edit(src, other, lambda a: a.__setitem__("step0/layer100000000/A", a["step0/layer0/A"]))
    elif case == "objects":
        shutil.copytree(src, other)
        buffer = io.BytesIO()
        np.save(buffer, np.array([{}], dtype=object), allow_pickle=True)
        _replace_member(other / "rank0.npz", "extra/objects.npy", buffer.getvalue())
    else:
        edit(src, other, _set("shard/n_vocab_local", np.int64(0)))
    _refused(run_compare(other if case == "zero-rows" else src, other), expected)


# --- inputs, tokens and tolerances -------------------------------------------------------------------------------

def test_decode_steps_fed_different_tokens_are_a_divergence(traces, tmp_path):
    changed = edit(traces["gpt2-tiny", 3], tmp_path / "fed", _set("step2/tokens", 99, (1, 0)))
    code, out, _ = run_compare(traces["gpt2-tiny", 2], changed)
    assert code == 1 and [r[0] for r in _table(out)] == ["0", "0", "1", "1"]  # steps 0 and 1 only
    token, position = np.load(traces["gpt2-tiny", 2] / "rank0.npz")["step2/tokens"][1].tolist()
    assert position == len(PROMPTS[1]) + 1 and token != 99
    assert first_divergence(out).startswith(f"first divergence: step 2 consumed different tokens: row 1 is token "
                                            f"{token} at position {position} in REF and token 99 at position "
                                            f"{position} in OTHER")
    untokened = edit(traces["gpt2-tiny", 3], tmp_path / "untokened",
                     lambda a: [a.pop(k) for k in list(a) if k.endswith("/tokens")])
    code, out, _ = run_compare(traces["gpt2-tiny", 2], untokened)
    assert code == 0 and "tokens not checked: OTHER has no step0/tokens" in out


def test_tolerance_defaults_follow_the_lower_precision(traces, paths, tmp_path):
    f32 = write_trace(tmp_path / "f32", paths["llama-gqa"], 2, dtype="float32")
    code, out, _ = run_compare(f32, traces["llama-gqa", 3])
    assert code == 0 and "rtol 0.001, atol 0.001 (the float32 defaults; REF is float32, OTHER float64)" in out
    code, out, _ = run_compare(f32, traces["llama-gqa", 3], "--rtol", "0", "--atol", "0")
    assert code == 1 and "(--rtol and --atol given; REF is float32, OTHER float64)" in out
    code, out, _ = run_compare(f32, traces["llama-gqa", 3], "--atol", "1e-4")
    assert "rtol 0.001, atol 0.0001 (--atol given; the other is the float32 default;" in out


def _precision(value):
    return lambda a: a.update({"meta/precision": np.array(value)})


def test_an_engine_that_computed_in_float32_gets_the_float32_tolerance_and_a_divergence_still_fails(traces, tmp_path):
    mixed = edit(traces["llama-gqa", 2], tmp_path / "mixed", _precision("float32"))
    code, out, _ = run_compare(traces["llama-gqa", 3], mixed)
    assert code == 0 and ("rtol 0.001, atol 0.001 (the float32 defaults; REF is float64, OTHER float64 computed "
                          "partly in float32, says its meta/precision)") in out
    value = float(np.load(mixed / "rank0.npz")["step1/layer1/D"][0, 3])  # MLP column 3 is on rank 0 of 2
    bad = edit(mixed, tmp_path / "bad", _set("step1/layer1/D", value + 0.01, (0, 3)), ranks={0})
    code, out, _ = run_compare(traces["llama-gqa", 3], bad)
    assert abs(value) < 1 and code == 1  # 0.01 off: beyond 1e-3 + 1e-3 |REF|
    assert first_divergence(out).startswith("first divergence: step 1, layer 1, tensor D, row 0 ")
    higher = edit(traces["llama-gqa", 2], tmp_path / "higher", _precision("float64"))
    assert "(the float64 defaults; REF is float64, OTHER float64)" in run_compare(traces["llama-gqa", 3], higher)[1]
    wrong = edit(traces["llama-gqa", 2], tmp_path / "wrong", _precision("fp8"))
    code, out, err = run_compare(traces["llama-gqa", 3], wrong)
    assert code == 2 and out == "" and err == (f"mpitp.compare: error: {wrong / 'rank0.npz'}: meta/precision is 'fp8'; "
                                               f"it names a dtype: float16, float32, float64.\n")


def test_the_command_line_is_serial_and_imports_neither_mpi4py_nor_torch(traces, tmp_path):
    bad = edit(traces["llama-gqa", 2], tmp_path / "bad", _set("step0/layer1/B", 5.0, (0, 0)), ranks={0})
    script = ("import sys; from mpitp.tools import compare, hftrace; code = compare.main(sys.argv[1:]); "
              "loaded = [m for m in ('mpi4py', 'torch', 'transformers') if m in sys.modules]; "
              "assert not loaded, loaded; sys.exit(code)")
    for args, code in (([traces["llama-gqa", 2], traces["llama-gqa", 3]], 0), ([bad, traces["llama-gqa", 3]], 1)):
        r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                           timeout=120, env=child_env(), cwd=str(REPO))
        assert r.returncode == code and r.stderr == "", r.stderr
    r = subprocess.run([sys.executable, "-m", "mpitp.compare", str(tmp_path / "nowhere"), str(bad)],
                       capture_output=True, text=True, timeout=120, env=child_env(), cwd=str(REPO))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "not a folder" in r.stderr


@serial_only
def test_mpirun_traces_at_2_and_3_ranks_compare_clean_and_a_changed_value_is_named(tmp_path):
    # What a user runs: mpitp.generate --trace on 2 and 3 real MPI ranks, then compare.
    for n in (2, 3):
        r = run_cli(["--model", model_dir("llama-gqa"), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "3",
                     "--dtype", "float64", "--trace", str(tmp_path / f"p{n}"), "--quiet"], n=n)
        assert r.returncode == 0, r.stderr
    code, out, err = run_compare(tmp_path / "p2", tmp_path / "p3")
    assert code == 0 and "within tolerance: all 51 tensors of 3 step(s)" in out, out + err
    # rank 1 of 3 holds query heads 3..5: its local column 10 is head 4, element 2
    bad = edit(tmp_path / "p3", tmp_path / "bad", _set("step0/layer1/B", 7.0, (2, 10)), ranks={1})
    code, out, _ = run_compare(tmp_path / "p2", bad)
    assert code == 1
    line = first_divergence(out)
    assert line.startswith("first divergence: step 0, layer 1, tensor B, row 2 (prompt 0, position 2, token 3), "
                           "query head 4 (its element 2 of 8; column 34): ")
    assert line.endswith("held by rank 1 of 2 in REF and rank 1 of 3 in OTHER")


# --- Hugging Face ------------------------------------------------------------------------------------------------

def run_hftrace(*args):
    from mpitp.tools import hftrace
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = hftrace.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hf_traces(tmp_path_factory):
    root, prompts = tmp_path_factory.mktemp("hf"), [a for p in PROMPTS for a in ("--prompt-ids", ",".join(map(str, p)))]
    for m in ("llama-gqa", "gpt2-tiny"):
        code, _, err = run_hftrace(model_dir(m), root / m, *prompts, "--max-new-tokens", "3")
        assert code == 0, err
    return {m: root / m for m in ("llama-gqa", "gpt2-tiny")}


@needs_hf
@pytest.mark.parametrize("model", ["llama-gqa", "gpt2-tiny"])
def test_hugging_face_and_mpitp_agree_tensor_by_tensor(traces, hf_traces, model):
    for p in (1, 2, 3, 4):
        code, out, err = run_compare(traces[model, p], hf_traces[model])
        precision = "float32 defaults; REF is float64, OTHER float64 computed partly in float32, says its " \
                    "meta/precision" if model == "llama-gqa" else "float64 defaults; REF is float64, OTHER float64"
        assert code == 0 and f"(the {precision})" in out, out + err
        assert "OTHER " + str(hf_traces[model]) + ": 1 rank, float64, 3 steps, 2 layers, config.json" in out
    if model == "gpt2-tiny":  # transformers' GPT-2 is float64 throughout: it agrees with mpitp far closer
        assert run_compare(traces[model, 2], hf_traces[model], "--rtol", "1e-11", "--atol", "1e-11")[0] == 0


@needs_hf
@pytest.mark.parametrize("model", ["llama-gqa", "gpt2-tiny"])
def test_the_hugging_face_trace_reproduces_the_goldens(tmp_path, model):
    # The goldens' float64 logits came from transformers' eager attention: hftrace gives exactly them.
    g = golden(model)
    code, _, err = run_hftrace(model_dir(model), tmp_path, "--prompt-ids", ",".join(map(str, g["prompt_L7"])),
                               "--max-new-tokens", "4", "--attn-implementation", "eager")
    assert code == 0, err
    t = np.load(tmp_path / "rank0.npz")
    assert np.abs(t["step0/logits"] - g["logits_f64_L7"]).max() <= 1e-12
    assert str(t["meta/engine"]).endswith("eager attention, float64)")
    for s in range(1, 4):  # decode step s consumed greedy token s-1 and gives the logits of token s
        assert t[f"step{s}/tokens"].tolist() == [[int(g["greedy_f64_L7"][s - 1]), 7 + s - 1]]
        assert np.abs(t[f"step{s}/logits"][0] - g["step_logits_f64_L7"][s]).max() <= 1e-12


@needs_hf
def test_a_perturbed_hugging_face_tensor_is_located(traces, hf_traces, tmp_path):
    bad = edit(hf_traces["llama-gqa"], tmp_path / "bad", _set("step1/layer0/K", 3.0, (1, 11)))
    code, out, _ = run_compare(traces["llama-gqa", 3], bad)
    assert code == 1
    assert first_divergence(out).startswith("first divergence: step 1, layer 0, tensor K, row 1 (the 2. sequence "
                                            "still generating, position 3, token ")
    assert ", key/value head 1 (its element 3 of 8; column 11): " in first_divergence(out)
    assert first_divergence(out).endswith("held by ranks 1 and 2 of 3 in REF and rank 0 of 1 in OTHER")


@needs_hf
def test_hftrace_bad_input_is_one_line_and_status_2(tmp_path):
    for args, expected in (([tmp_path / "none", tmp_path / "out", "--prompt-ids", "1"],
                            "config.json: cannot be opened"),
                           ([model_dir("llama-gqa"), tmp_path / "out", "--prompt-ids", "1,300"],
                            "token id 300 is outside the vocabulary 0..257"),
                           ([model_dir("gpt2-tiny"), tmp_path / "out", "--prompt-ids", "1", "--max-new-tokens",
                             "128"], "the prompt (1 tokens) plus max-new-tokens (128) is 129 tokens, more than the "
                                     "model's context of 128.")):
        code, out, err = run_hftrace(*args)
        assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("mpitp.hftrace: error: "), err
        assert expected in err, err


def test_hftrace_without_torch_says_which_extra_in_one_line(tmp_path):
    # torch made unimportable (as when the 'hf' extra is not installed): one line naming the extra, status 2
    script = ("import sys; sys.modules['torch'] = None; from mpitp.tools import hftrace; "
              f"sys.exit(hftrace.main([{model_dir('gpt2-tiny')!r}, {str(tmp_path)!r}, '--prompt-ids', '1']))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=child_env(),
                       cwd=str(REPO))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mpitp.hftrace: error: needs torch and transformers, the 'hf' extra: pip install "
                               "'mpitp[hf]'")


def test_the_writer_example_in_the_docs_makes_a_trace_compare_accepts(traces, tmp_path):
    # docs/trace.md's minimal writer, run as written, on mpitp's 1-rank tensors: an unsharded trace of "an engine".
    example = re.search(r"```python\n(# A minimal writer.*?)```", (REPO / "docs" / "trace.md").read_text(), re.S)
    namespace = {}
    exec(example.group(1), namespace)  # noqa: S102 -- the documentation's own example
    src = np.load(traces["gpt2-tiny", 1] / "rank0.npz")
    tensors = {k: src[k] for k in src.files if k.startswith("step")}
    namespace["save_trace"](tmp_path / "mine", tensors, d_head=16, config_json=f"{model_dir('gpt2-tiny')}/config.json")
    code, out, err = run_compare(traces["gpt2-tiny", 3], tmp_path / "mine", "--rtol", "1e-11", "--atol", "1e-11")
    assert code == 0 and f"1 rank, float64, 3 steps, 2 layers, config.json {str(src['meta/config_sha256'])[:12]}" \
        in out, out + err


def test_a_report_that_cannot_be_written_is_an_error_never_a_divergence(traces):
    # Before: on /dev/full, traces that agree exited 1 (a divergence's status) with "unexpected error: OSError";
    # with stdout closed (>&-), 0 with the report lost. A closed stdout is refused before any work.
    cmd = [sys.executable, "-m", "mpitp.compare", str(traces["gpt2-tiny", 1]), str(traces["gpt2-tiny", 2])]
    closed, full, gone = unwritable_stdout(cmd)
    assert [(r.returncode, r.stderr) for r in (closed, full, gone)] == [(2, "mpitp.compare: " + CLOSED),
                                                                       (2, "mpitp.compare: " + FULL), (141, "")]


@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_bad_input_is_status_2_even_when_stderr_cannot_be_written(tmp_path, stderr):
    # Exit 1 means a divergence: a missing trace folder must be 2 even when its one line cannot be written.
    redirect = "2>&-" if stderr == "closed" else "2>/dev/full"
    r = subprocess.run(["sh", "-c", f'"$@" {redirect}', "sh", sys.executable, "-m", "mpitp.compare",
                        str(tmp_path / "a"), str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60,
                       env=child_env(), cwd=str(REPO))
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
