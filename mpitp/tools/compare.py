"""Compare two traces tensor by tensor: ``python -m mpitp.compare REF OTHER [--rtol R] [--atol A]``.

REF and OTHER are trace folders (docs/trace.md) of any rank counts: mpitp at 2 ranks against another engine at
4, or against an unsharded single-process trace such as ``python -m mpitp.hftrace`` writes. Every rank's part of
a tensor is placed at its global columns from its file's ``shard/*`` numbers, so any split compares with any
other, uneven ones included, pipeline stages too (their files hold their layers only: ``stage/*``), and every
copy is compared: each rank's copy of a replicated tensor (A, C, E), both
copies of a key/value head two ranks share. An element is within tolerance when
``|OTHER - REF| <= atol + rtol * |REF|`` (NumPy's ``isclose``); a NaN never is.

Prints a table of the max abs and max rel error per step, layer and tensor (``--summary``: a line per step
instead), then the first divergence (in the
order the model computes: step, layer, A Q K V B C D E, then the step's logits), named by step, layer, tensor,
row and, for a sharded tensor, the global head, MLP column or vocabulary id and the ranks that hold it in each
trace. Exit status 0: everything within tolerance; 1: something is not; 2: bad input (one line on stderr).
A serial tool: it never imports mpi4py.
"""

import argparse
import itertools
import math
import os
import re
import sys
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..cli.runner import HelpFormatter, check_stdout, out, run_guarded
from ..errors import MpitpError, open_regular

PROG = "mpitp.compare"
VERSION = 1  # the trace format this reads (format/version)
# A layer's tensors in the order the block computes them (a mixture of experts' R and M in place of D); then
# step{s}/logits
NAMES = "AQKVBCDRME"
ORDER = list(NAMES) + ["logits"]
# How each sharded tensor is split: its shard/* range (start key, count key) and the global unit it names.
SPLITS = {"Q": "head", "B": "head", "K": "kv", "V": "kv", "D": "ffn", "logits": "vocab"}  # A, C, R, M, E: replicated
RANGES = {"head": ("head_start", "n_head_local", "query heads"), "kv": ("kv_head_start", "n_kv_head_local",
                                                                         "key/value heads"),
          "ffn": ("ffn_start", "n_ffn_local", "MLP columns"), "vocab": ("vocab_start", "n_vocab_local",
                                                                          "vocabulary ids")}
SHARD_KEYS = ("rank", "size", "d_head") + tuple(k for start, count, _ in RANGES.values() for k in (start, count))
STAGE_KEYS = ("index", "count", "first_layer", "n_layer_local")  # a pipeline stage's file (--pp): stage/*
# Default (rtol, atol) by the lower precision of the two traces: a trace's tensors' dtype, or its meta/precision
# when lower (Hugging Face's float64 Llama computes RMSNorm and RoPE's cos/sin in float32; hftrace records it).
# float32's atol is 1e-3: on SmolLM2-135M, whose residual stream has outliers in the hundreds, mpitp's float64
# trace and Hugging Face's differ by up to 0.41 of (1e-3, 1e-3), and 1.3 times (1e-3, 1e-4) (docs/trace.md).
DEFAULT_TOL = {"float64": (1e-5, 1e-5), "float32": (1e-3, 1e-3), "float16": (1e-2, 1e-2)}
PRECISION = ["float16", "float32", "float64"]
_NUMBER = r"(0|[1-9][0-9]{0,17})"  # decimal, no leading zero: one spelling per number, and int() stays cheap
_KEY = re.compile(rf"step{_NUMBER}/(?:layer{_NUMBER}/([A-Z]+)|(logits|tokens))\Z")
_DEFLATE_RATIO = 1032  # deflate expands at most this much: a member that claims more lies about its size


class CompareError(MpitpError):
    """Bad input: one line on stderr, exit status 2."""


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mpitp.compare", formatter_class=HelpFormatter,
                                description="Compare two traces (docs/trace.md) of any rank counts tensor by "
                                            "tensor. Exit status 0: all within tolerance, 1: not, 2: bad input.")
    p.add_argument("ref", metavar="REF", help="the reference trace folder (rank0.npz, rank1.npz, ...), e.g. "
                                              "written by mpirun -n 2 python -m mpitp.generate --trace REF")
    p.add_argument("other", metavar="OTHER", help="the trace folder to check against REF, of any rank count")
    p.add_argument("--rtol", type=float, default=None, metavar="R",
                   help="relative tolerance (default by dtype: " + ", ".join(
                       f"{d} {r:g}" for d, (r, a) in DEFAULT_TOL.items()) + ")")
    p.add_argument("--atol", type=float, default=None, metavar="A",
                   help="absolute tolerance (default by dtype: " + ", ".join(
                       f"{d} {a:g}" for d, (r, a) in DEFAULT_TOL.items()) + ")")
    p.add_argument("--tensors", default=None, metavar="LIST",
                   help="compare only these, comma-separated, from A,Q,K,V,B,C,D,E,logits (default: every one "
                        "either trace has; both must have each)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="compare only steps 0..N-1 (default: every step; both traces must have as many)")
    p.add_argument("--summary", action="store_true",
                   help="instead of the table (a row per step and layer), one line per step: its tensors out of "
                        "tolerance, its largest difference and the tensor closest to its tolerance")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks for errors")
    return p


@dataclass
class Part:
    """One rank's part of a tensor: global columns ``start:stop`` of the full tensor."""

    rank: int
    start: int
    stop: int
    array: np.ndarray


class TraceDir:
    """A trace folder: every rank's file, checked against the format (``CompareError`` names what is wrong)."""

    def __init__(self, path, label):
        self.path, self.label = path, label
        if not os.path.isdir(path):
            raise CompareError(f"{label} {path}: not a folder; give a trace folder (rank0.npz, rank1.npz, ...), "
                               f"as python -m mpitp.generate --trace DIR writes.")
        ranks = sorted(int(m.group(1)) for m in (re.fullmatch(r"rank(\d+)\.npz", n) for n in os.listdir(path)) if m)
        if not ranks:
            raise CompareError(f"{label} {path}: no rank{{r}}.npz files; give a trace folder, as python -m "
                               f"mpitp.generate --trace DIR writes.")
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        if missing:
            raise CompareError(f"{label} {path}: rank{missing[0]}.npz is missing (there is rank{max(ranks)}.npz); "
                               f"a trace of P ranks has rank0.npz .. rank{{P-1}}.npz.")
        self.size = len(ranks)
        self.files = [self._open(r) for r in ranks]
        self.stages = [self._stage(r) for r in ranks]
        self.tp = self.size // self.stages[0]["count"] if self.stages[0] else self.size  # files per stage
        self.shards = []
        for r in range(self.size):
            self.shards.append(self._shard(r))
        self.d_head = self.shards[0]["d_head"]
        self.widths = {kind: self._tile(kind) for kind in RANGES}
        self.keys = self._tensor_keys()
        self.steps = 1 + max(s for s, _, _ in self.keys)
        self.layers = 1 + max((l for _, l, _ in self.keys if l is not None), default=-1)
        self.names = [n for n in ORDER if any(k[2] == n for k in self.keys)]
        self._complete()
        self.meta = {k: str(self.get(0, k)) for k in ("meta/config_sha256", "meta/engine", "meta/precision")
                     if k in self.files[0]}
        first = next(f"step0/layer0/{n}" if n in NAMES else f"step0/{n}" for n in self.names)
        self.dtype = self.get(0, first).dtype
        if self.dtype.name not in PRECISION:
            raise CompareError(f"{self.where(0)}: {first} is {self.dtype.name}; a trace's tensors are float16, "
                               f"float32 or float64.")

    def where(self, rank):
        return os.path.join(self.path, f"rank{rank}.npz")

    def _open(self, r):
        try:
            f = np.load(os.fdopen(open_regular(self.where(r)), "rb"), allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CompareError(f"{self.where(r)}: not a NumPy .npz archive ({e}).") from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise CompareError(f"{self.where(r)}: a single .npy array, not a .npz archive of named arrays.")
        for info in f.zip.infolist():  # before anything is read: a header that lies must not allocate
            _check_member(self.where(r), f.zip, info)
        return f

    def get(self, rank, key):
        try:
            return self.files[rank][key]
        except KeyError:
            raise CompareError(f"{self.where(rank)} has no key '{key}' (docs/trace.md lists the required "
                               f"keys).") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise CompareError(f"{self.where(rank)}: key '{key}' cannot be read as a plain array ({e}).") from None
        except MemoryError:  # a true header, but more than this machine holds
            raise CompareError(f"{self.where(rank)}: key '{key}' does not fit in memory.") from None

    def _int(self, rank, key):
        value = self.get(rank, key)
        if value.shape != () or not np.issubdtype(value.dtype, np.integer):
            raise CompareError(f"{self.where(rank)}: '{key}' must be an integer scalar, got {value.dtype.name} "
                               f"of shape {list(value.shape)}.")
        return int(value)

    def _stage(self, r):
        """The ``stage/*`` numbers of rank r's file (a pipeline stage's), or None (every layer)."""
        version = self._int(r, "format/version")
        if version != VERSION:
            raise CompareError(f"{self.where(r)}: format/version is {version}; this compare reads version "
                               f"{VERSION} (docs/trace.md).")
        if ("stage/index" in self.files[r]) != ("stage/index" in self.files[0]):
            lacks, has = (r, 0) if "stage/index" in self.files[0] else (0, r)
            raise CompareError(f"{self.where(lacks)} has no key 'stage/index', which rank{has}.npz has: a pipeline's "
                               f"trace has stage/* in every file.")
        if "stage/index" not in self.files[r]:
            return None
        stage = {k: self._int(r, f"stage/{k}") for k in STAGE_KEYS}
        count = stage["count"]
        if count < 1 or self.size % count or stage["index"] != r // (self.size // count):
            raise CompareError(f"{self.where(r)}: stage/index {stage['index']} of stage/count {count} does not fit "
                               f"{self.size} files: rank r is in stage r // (files / stage/count).")
        return stage

    def _shard(self, r):
        shard = {k: self._int(r, f"shard/{k}") for k in SHARD_KEYS}
        if shard["rank"] != r % self.tp or shard["size"] != self.tp:
            stage = f" of its stage of {self.tp}" if self.tp < self.size else ""
            raise CompareError(f"{self.where(r)}: shard/rank is {shard['rank']} and shard/size {shard['size']}, "
                               f"but the file is rank{r}.npz of {self.size}{stage}: they must agree.")
        bad = [k for k in SHARD_KEYS if shard[k] < (1 if k == "d_head" else 0)]
        if bad:
            raise CompareError(f"{self.where(r)}: shard/{bad[0]} is {shard[bad[0]]}; it must be >= "
                               f"{1 if bad[0] == 'd_head' else 0}.")
        if r and shard["d_head"] != self.shards[0]["d_head"]:
            raise CompareError(f"{self.where(r)}: shard/d_head is {shard['d_head']}, but "
                               f"{self.shards[0]['d_head']} in rank0.npz.")
        return shard

    def _tile(self, kind):
        """The global count of heads, columns or ids; the ranks' ranges must cover 0..count-1 with no gap (and
        overlap only for key/value heads, which two ranks can share)."""
        start_key, count_key, what = RANGES[kind]
        ranges = sorted((s[start_key], s[start_key] + s[count_key], s["rank"]) for s in self.shards[:self.tp]
                        if s[count_key])  # every stage is split alike: the first's ranks
        end, last = 0, None
        for start, stop, r in ranges:
            if start > end or (start < end and kind != "kv"):
                gap = f"{what} {end}..{start - 1} are on no rank" if start > end else \
                    f"{what} {start}..{min(stop, end) - 1} are on two ranks (rank{last}.npz and rank{r}.npz)"
                raise CompareError(f"{self.label} {self.path}: the ranks' shard/{start_key} and shard/{count_key} "
                                   f"do not tile the model: {gap}.")
            end, last = max(end, stop), r
        if end == 0:
            raise CompareError(f"{self.label} {self.path}: no rank holds any {what} (every shard/{count_key} is 0); "
                               f"write the whole range even when no tensor uses it.")
        return end

    def _tensor_keys(self):
        """Every tensor key of the trace; each file's own in ``self.held`` (a stage's files: its layers only)."""
        self.held = []
        for r, f in enumerate(self.files):
            found = set()
            for k in f.files:
                m = _KEY.match(k)
                if m and (m.group(4) or m.group(3) in NAMES):
                    found.add((int(m.group(1)), None if m.group(4) else int(m.group(2)), m.group(4) or m.group(3)))
            first = r - r % self.tp  # the first file of its stage
            if r != first and found != self.held[first]:
                key = sorted(found ^ self.held[first], key=str)[0]
                lacks, has = (r, first) if key in self.held[first] else (first, r)
                raise CompareError(f"{self.where(lacks)} has no key '{key_name(*key)}', which rank{has}.npz has: "
                                   f"every rank's file {'of a stage ' if self.tp < self.size else ''}has the same "
                                   f"keys.")
            self.held.append(found)
        keys = set().union(*self.held)
        if not any(n != "tokens" for _, _, n in keys):
            raise CompareError(f"{self.where(0)}: no tensors (step{{s}}/layer{{l}}/A .. E or step{{s}}/logits); "
                               f"is it a trace?")
        return keys

    def _complete(self):
        """Every step has every layer's named tensors and the same step-level keys: no holes."""
        layer_names = [n for n in self.names if n != "logits"]
        step_names = [n for n in ("logits", "tokens") if any(k[2] == n for k in self.keys)]
        if len(self.keys) == self.steps * (self.layers * len(layer_names) + len(step_names)):
            return  # as many distinct keys as the steps and layers need, each in range: all of them
        # Else the first missing one, in order: found within len(keys) + 1 candidates, so that a key claiming
        # layer 100000000 is refused at once instead of after a walk over every layer up to it.
        expected = ((s, l, n) for s in range(self.steps) for l in itertools.chain(range(self.layers), [None])
                    for n in (layer_names if l is not None else step_names))
        key = next(k for k in expected if k not in self.keys)
        raise CompareError(f"{self.where(0)} has no key '{key_name(*key)}' (the trace has {self.steps} steps and "
                           f"{self.layers} layers: every step has every key).")

    def rows(self, step):
        """``[rows, 2]`` token ids and positions of a step, or None when the trace has no tokens."""
        if (step, None, "tokens") not in self.keys:
            return None
        tokens = self.get(0, f"step{step}/tokens")
        if tokens.ndim != 2 or tokens.shape[1] != 2 or not np.issubdtype(tokens.dtype, np.integer) or not len(tokens):
            raise CompareError(f"{self.where(0)}: step{step}/tokens must be integers [rows, 2] (token id, position) "
                               f"with rows >= 1, got {tokens.dtype.name} {list(tokens.shape)}.")
        return tokens

    def width(self, name):
        """The global width of tensor ``name``: None for a replicated one (every rank's copy is whole)."""
        kind = SPLITS.get(name)
        if kind is None:
            return None
        return self.widths[kind] * (self.d_head if kind in ("head", "kv") else 1)

    def parts(self, step, layer, name):
        """Every rank's part of a tensor, with its global columns, checked against the file's shard numbers."""
        key, kind, tokens = key_name(step, layer, name), SPLITS.get(name), self.rows(step)
        parts = []
        for r, shard in enumerate(self.shards):
            if (step, layer, name) not in self.held[r]:  # another stage's layer
                continue
            a = self.get(r, key)
            rows = len(tokens) if tokens is not None else parts[0].array.shape[0] if parts else None
            if kind is None:  # replicated: every rank's copy is as wide as rank 0's
                start, count, why = 0, parts[0].array.shape[1] if parts else None, " (as wide as rank 0's copy)"
            else:
                start_key, count_key, _ = RANGES[kind]
                unit = self.d_head if kind in ("head", "kv") else 1
                start, count = shard[start_key] * unit, shard[count_key] * unit
                why = f" (shard/{count_key}{' x shard/d_head' if unit > 1 else ''} columns)"
            if a.ndim != 2 or a.shape[1] != (count or a.shape[1]) or a.shape[0] != (rows or a.shape[0]):
                expected = f"[{rows if rows is not None else 'rows'}, {count if count is not None else 'width'}]"
                why += f", a row per token of step{step}/tokens" if tokens is not None else ""
                raise CompareError(f"{self.where(r)}: {key} is {list(a.shape)}, expected {expected}{why}.")
            if a.shape[0] == 0 or a.shape[1] == 0 and kind is None:
                raise CompareError(f"{self.where(r)}: {key} is {list(a.shape)}; a tensor has a row per token the "
                                   f"forward consumed (at least one){'' if kind else ' and at least one column'}.")
            count = a.shape[1]
            if a.dtype.name not in PRECISION:
                raise CompareError(f"{self.where(r)}: {key} is {a.dtype.name}; a trace's tensors are float16, "
                                   f"float32 or float64.")
            parts.append(Part(r, start, start + count, a))
        return parts

    def describe(self):
        what = [f"{self.size} rank{'s' if self.size > 1 else ''}", self.dtype.name, f"{self.steps} steps",
                f"{self.layers} layers"]
        what += [f"config.json {self.meta['meta/config_sha256'][:12]}"] if "meta/config_sha256" in self.meta else []
        what += [self.meta["meta/engine"]] if "meta/engine" in self.meta else []
        return f"{self.label:5} {self.path}: {', '.join(what)}"

    def close(self):
        for f in self.files:
            f.close()


def _check_member(path, archive, info):
    """The archive member ``info`` of the trace file ``path`` is a .npy array of plain numbers whose header
    (shape and dtype) matches the bytes the member holds, and the member's size is one its compressed bytes can
    hold; read from the header alone, so a header claiming 32 TiB is refused before anything is allocated."""
    key = info.filename.removesuffix(".npy")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.file_size > (
            info.compress_size if info.compress_type == zipfile.ZIP_STORED else info.compress_size * _DEFLATE_RATIO):
        raise CompareError(f"{path}: key '{key}' claims {info.file_size} bytes in {info.compress_size} compressed "
                           f"ones; the archive is corrupt (np.savez and np.savez_compressed write traces).")
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                               np.lib.format.read_array_header_2_0)(f)
            header = f.tell()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise CompareError(f"{path}: key '{key}' is not a NumPy array ({e}).") from None
    if dtype.hasobject:
        raise CompareError(f"{path}: key '{key}' holds Python objects; a trace holds plain arrays.")
    n_bytes = math.prod(shape) * dtype.itemsize
    if n_bytes != info.file_size - header:
        raise CompareError(f"{path}: key '{key}' is {dtype.name} of shape {list(shape)} ({n_bytes} bytes) by its "
                           f"header, but holds {info.file_size - header} bytes; the file is corrupt.")


def key_name(step, layer, name):
    return f"step{step}/{name}" if layer is None else f"step{step}/layer{layer}/{name}"


@dataclass
class Finding:
    """The worst element of one tensor: its errors and where it is."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ratio: float = 0.0  # the largest error over its tolerance (> 1: out of tolerance)
    n_bad: int = 0
    worst: tuple = None  # (ratio to the tolerance, row, global column)


def _errors(ref, other, rtol, atol):
    """``|other - ref|`` (inf where either is NaN or only one is infinite, 0 where both are the same infinity),
    its tolerance (0 where REF is not finite: only the same value passes), and the relative error
    ``|other - ref| / |ref|`` (inf where REF is 0 or not finite and the two differ)."""
    ref64, other64 = np.asarray(ref, dtype=np.float64), np.asarray(other, dtype=np.float64)
    finite, size = np.isfinite(ref64), np.abs(ref64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.abs(other64 - ref64)
        diff[ref64 == other64] = 0.0
        diff[np.isnan(diff)] = np.inf
        rel = np.where(diff == 0, 0.0, np.where(finite & (size > 0), diff / size, np.inf))
    return diff, np.where(finite, atol + rtol * size, 0.0), rel


def _overlaps(ref_parts, other_parts):
    """Every pair of a REF part and an OTHER part that share global columns, with the shared range."""
    for p in ref_parts:
        for q in other_parts:
            start, stop = max(p.start, q.start), min(p.stop, q.stop)
            if start < stop:
                yield p, q, start, stop


def compare_tensor(ref_parts, other_parts, rtol, atol):
    """Each REF copy of every element against each OTHER copy: the ``Finding`` of this tensor."""
    found = Finding()
    bad_elements = np.zeros((ref_parts[0].array.shape[0], max(p.stop for p in ref_parts)), dtype=bool)
    for p, q, start, stop in _overlaps(ref_parts, other_parts):
        a, b = p.array[:, start - p.start:stop - p.start], q.array[:, start - q.start:stop - q.start]
        diff, tol, rel = _errors(a, b, rtol, atol)
        bad = diff > tol
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(tol > 0, diff / tol, np.where(diff > 0, np.inf, 0.0))
        found.max_abs, found.max_rel = max(found.max_abs, float(diff.max())), max(found.max_rel, float(rel.max()))
        found.max_ratio = max(found.max_ratio, float(ratio.max()))
        if bad.any():
            bad_elements[:, start:stop] |= bad
            row, col = np.unravel_index(int(np.argmax(np.where(bad, ratio, -1.0))), ratio.shape)
            if found.worst is None or ratio[row, col] > found.worst[0]:
                found.worst = (float(ratio[row, col]), int(row), start + int(col))
    found.n_bad = int(bad_elements.sum())
    return found


def _value(parts, row, column):
    return {p.rank: p.array[row, column - p.start] for p in parts if p.start <= column < p.stop}


def _list(ranks):
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def _ranks(ranks, size):
    return f"every rank (0..{size - 1})" if len(ranks) == size > 2 else f"{_list(ranks)} of {size}"


def locate(ref, other, step, layer, name, ref_parts, other_parts, row, column, rtol, atol):
    """The first-divergence line: which element, its values, and which ranks hold it in each trace (with more
    than one copy in a trace, which copies are out of tolerance against every copy in the other)."""
    ref_values, other_values = _value(ref_parts, row, column), _value(other_parts, row, column)

    def ratio(x, y):  # the error of REF value x and OTHER value y over its tolerance
        diff, tol, _ = _errors(np.array([[x]]), np.array([[y]]), rtol, atol)
        return diff[0, 0] / tol[0, 0] if tol[0, 0] > 0 else np.inf if diff[0, 0] > 0 else 0.0

    odd_ref = [r for r, x in ref_values.items() if all(ratio(x, y) > 1 for y in other_values.values())]
    odd_other = [r for r, y in other_values.items() if all(ratio(x, y) > 1 for x in ref_values.values())]
    where = []
    for trace, mine, odd in ((ref, ref_values, odd_ref), (other, other_values, odd_other)):
        text = f"{_ranks(sorted(mine), trace.size)} in {trace.label}"
        if 0 < len(odd) < len(mine):  # a trace's copies disagree: name the ones the other trace disagrees with
            text += f" (the copy on {_list(sorted(odd))} differs)"
        where.append(text)
    r_value, o_value = max(((x, y) for x in ref_values.values() for y in other_values.values()),
                           key=lambda xy: ratio(*xy))  # the worst pair of copies
    diff, tol, _ = _errors(np.array([[r_value]]), np.array([[o_value]]), rtol, atol)
    kind = SPLITS.get(name)
    if kind in ("head", "kv"):
        what = f"{'query' if kind == 'head' else 'key/value'} head {column // ref.d_head} (its element " \
               f"{column % ref.d_head} of {ref.d_head}; column {column})"
    else:
        what = {"ffn": f"MLP column {column}", "vocab": f"vocabulary id {column}"}.get(kind, f"column {column}")
    tensor = f"layer {layer}, tensor {name}" if layer is not None else "logits"
    return (f"first divergence: step {step}, {tensor}, {_row(ref, other, step, row)}, {what}: REF {r_value}, OTHER "
            f"{o_value}, |OTHER - REF| {diff[0, 0]:.3g} > tolerance {tol[0, 0]:.3g}; held by {where[0]} and "
            f"{where[1]}")


def _row(ref, other, step, row):
    tokens = ref.rows(step) if ref.rows(step) is not None else other.rows(step)
    if tokens is None:
        return f"row {row}"
    token, position = (int(x) for x in tokens[row])
    if step > 0:  # a decode step has a row per sequence still generating: which prompt is not recorded
        return f"row {row} (the {row + 1}. sequence still generating, position {position}, token {token})"
    return f"row {row} (prompt {int(np.sum(tokens[:row + 1, 1] == 0)) - 1}, position {position}, token {token})"


def _check_pair(ref, other, args):
    """Refuse traces that cannot be compared; return (steps to compare, tensor names)."""
    a, b = ref.meta.get("meta/config_sha256"), other.meta.get("meta/config_sha256")
    if a and b and a != b:
        raise CompareError(f"REF and OTHER are traces of different models: their config.json files differ "
                           f"(SHA-256 {a[:12]}... in REF {ref.path}, {b[:12]}... in OTHER {other.path}).")
    if ref.layers != other.layers:
        raise CompareError(f"REF {ref.path} has {ref.layers} layers and OTHER {other.path} {other.layers}: traces "
                           f"of different models.")
    if ref.d_head != other.d_head:
        raise CompareError(f"shard/d_head is {ref.d_head} in REF {ref.path} and {other.d_head} in OTHER "
                           f"{other.path}: traces of different models.")
    a, b = ref.rows(0), other.rows(0)
    if a is not None and b is not None and (a.shape != b.shape or not np.array_equal(a, b)):
        raise CompareError(_prompt_difference(a, b))
    if args.tensors is None:
        names = [n for n in ORDER if n in ref.names or n in other.names]
    else:
        names = [n.strip() for n in args.tensors.split(",") if n.strip()]
        unknown = [n for n in names if n not in ORDER]
        if unknown or not names:
            raise CompareError(f"--tensors {args.tensors}: {unknown[0] if unknown else 'nothing'} is not a tensor "
                               f"name; use a comma-separated list from A,Q,K,V,B,C,D,E,logits.")
    for n in names:
        for trace, them in ((ref, other), (other, ref)):
            if n not in trace.names:
                key = key_name(0, 0 if n in NAMES else None, n)
                has = f" ({them.label} has it)" if n in them.names else ""
                raise CompareError(f"{trace.label} {trace.path} has no {key}{has}: compare fewer tensors with "
                                   f"--tensors (e.g. --tensors {','.join(x for x in names if x != n)}).")
    steps = args.steps
    if steps is None:
        if ref.steps != other.steps:
            raise CompareError(f"REF {ref.path} has {ref.steps} steps and OTHER {other.path} {other.steps}: trace as "
                               f"many new tokens (mpitp.generate stops at end-of-sequence unless --ignore-eos), or "
                               f"compare the first ones with --steps N.")
        steps = ref.steps
    elif not 1 <= steps <= min(ref.steps, other.steps):
        raise CompareError(f"--steps {steps}: REF has {ref.steps} steps and OTHER {other.steps}; give 1 to "
                           f"{min(ref.steps, other.steps)}.")
    return steps, names


def _check_tokens(ref, other, steps):
    """The steps whose inputs agree (``_check_pair`` refused different prompts). Returns (steps, a note or None,
    the line that says which decode step consumed different tokens, or None)."""
    for s in range(steps):
        a, b = ref.rows(s), other.rows(s)
        if a is None or b is None:
            missing = ref if a is None else other
            return steps, f"tokens not checked: {missing.label} has no step{s}/tokens", None
        if a.shape != b.shape or not np.array_equal(a, b):
            row = int(np.argmax(np.any(a != b, axis=1))) if a.shape == b.shape else 0
            return s, None, (f"first divergence: step {s} consumed different tokens: row {row} is token "
                             f"{int(a[row, 0])} at position {int(a[row, 1])} in REF and token {int(b[row, 0])} at "
                             f"position {int(b[row, 1])} in OTHER (the engines chose different tokens at step "
                             f"{s - 1}); steps {s}.. are not compared")
    return steps, None, None


def _prompts(tokens):
    """Step 0's rows cut into prompts (a prompt starts at position 0)."""
    starts = sorted({0} | set(np.flatnonzero(tokens[:, 1] == 0).tolist())) + [len(tokens)]
    return [tokens[a:b, 0].tolist() for a, b in zip(starts, starts[1:])]


def _prompt_difference(a, b):
    pa, pb = _prompts(a), _prompts(b)
    if len(pa) != len(pb):
        why = f"REF has {len(pa)} prompt(s) and OTHER {len(pb)}"
    else:
        i = next(i for i, (x, y) in enumerate(zip(pa, pb)) if x != y)
        j = next((j for j, (x, y) in enumerate(zip(pa[i], pb[i])) if x != y), None)
        why = (f"prompt {i} has {len(pa[i])} tokens in REF and {len(pb[i])} in OTHER" if j is None else
               f"prompt {i} has token {pa[i][j]} at position {j} in REF and {pb[i][j]} in OTHER")
    return f"REF and OTHER have different prompts: {why}; compare traces of the same prompt ids."


def _precision(trace):
    """The precision a trace's values carry: its dtype, or its engine's ``meta/precision`` when that is lower;
    and how to say so."""
    computed = trace.meta.get("meta/precision", trace.dtype.name)
    if computed not in PRECISION:
        raise CompareError(f"{trace.where(0)}: meta/precision is {computed!r}; it names a dtype: "
                           f"{', '.join(PRECISION)}.")
    if PRECISION.index(computed) >= PRECISION.index(trace.dtype.name):
        return trace.dtype.name, trace.dtype.name
    return computed, f"{trace.dtype.name} computed partly in {computed}, says its meta/precision"


def _tolerance(ref, other, args):
    (ref_low, ref_says), (other_low, other_says) = _precision(ref), _precision(other)
    low = min(ref_low, other_low, key=PRECISION.index)
    rtol, atol = DEFAULT_TOL[low]
    given = [f for f, v in (("--rtol", args.rtol), ("--atol", args.atol)) if v is not None]
    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if value is not None and not (value >= 0 and np.isfinite(value)):
            raise CompareError(f"{flag} {value}: a tolerance is a finite number >= 0.")
    rtol, atol = (args.rtol if args.rtol is not None else rtol), (args.atol if args.atol is not None else atol)
    source = f"the {low} defaults" if not given else f"{' and '.join(given)} given" + (
        f"; the other is the {low} default" if len(given) == 1 else "")
    return rtol, atol, (f"tolerance: |OTHER - REF| <= atol + rtol |REF| with rtol {rtol:g}, atol {atol:g} ({source}; "
                        f"REF is {ref_says}, OTHER {other_says})")


def _cell(found):
    if found is None:
        return ""
    text = "0" if found.max_abs == 0 else f"{found.max_abs:.0e}/{found.max_rel:.0e}"
    return text + ("*" if found.n_bad else "")


def run(args):
    check_stdout()  # before the work: its report would be lost, and a lost report must not read as agreement
    ref, other = TraceDir(args.ref, "REF"), TraceDir(args.other, "OTHER")
    try:
        steps, names = _check_pair(ref, other, args)
        rtol, atol, tol_line = _tolerance(ref, other, args)
        steps, note, fed = _check_tokens(ref, other, steps)
        results = {}
        for s in range(steps):
            for l in list(range(ref.layers)) + [None]:
                for n in names:
                    if (l is None) != (n == "logits"):
                        continue
                    rp, op = ref.parts(s, l, n), other.parts(s, l, n)
                    a, b = _shape(rp, ref.width(n)), _shape(op, other.width(n))
                    if a != b:
                        raise CompareError(f"shape mismatch: {key_name(s, l, n)} is {a} in REF {ref.path} and {b} "
                                           f"in OTHER {other.path} (reassembled from every rank): traces of "
                                           f"different models or prompts.")
                    results[s, l, n] = (compare_tensor(rp, op, rtol, atol), rp, op)
        lines = [ref.describe(), other.describe(), tol_line] + ([note] if note else [])
        lines += _summary(results) if args.summary else _table(results, steps, ref.layers, names)
        failed = [(k, v) for k, v in results.items() if v[0].n_bad]
        if failed:
            (s, l, n), (found, rp, op) = failed[0]
            _, row, column = found.worst
            lines.append(f"out of tolerance: {sum(v[0].n_bad for _, v in failed)} element(s) in {len(failed)} of "
                         f"{len(results)} tensors")
            lines.append(locate(ref, other, s, l, n, rp, op, row, column, rtol, atol))
        if fed:
            lines.append(fed if not failed else "then: " + fed.split(": ", 1)[1])
        if not failed and not fed:
            (s, l, n), (found, _, _) = max(results.items(), key=lambda kv: kv[1][0].max_abs)
            (s2, l2, n2), (closest, _, _) = max(results.items(), key=lambda kv: kv[1][0].max_ratio)
            lines.append(f"within tolerance: all {len(results)} tensors of {steps} step(s); the largest difference "
                         f"is {found.max_abs:.3g} ({key_name(s, l, n)}); the closest to the tolerance is "
                         f"{key_name(s2, l2, n2)}, at {closest.max_ratio:.2g} of it")
        out("\n".join(lines))  # an unwritable report is status 2, never 1 (a divergence) or 0
        return 1 if failed or fed else 0
    finally:
        ref.close()
        other.close()


def _shape(parts, width):
    return [parts[0].array.shape[0], width if width is not None else parts[0].array.shape[1]]


def _summary(results):
    """``--summary``: a line per step compared, from the same findings as the table."""
    lines = []
    for s in sorted({key[0] for key in results}):
        found = {key: v[0] for key, v in results.items() if key[0] == s}
        largest, closest = (max(found, key=lambda k: getattr(found[k], x)) for x in ("max_abs", "max_ratio"))
        lines.append(f"step {s}: {sum(1 for f in found.values() if f.n_bad)} of {len(found)} tensors out of "
                     f"tolerance; the largest difference {found[largest].max_abs:.3g} ({key_name(*largest)}); the "
                     f"closest to the tolerance {key_name(*closest)}, at {found[closest].max_ratio:.2g} of it")
    return lines


def _table(results, steps, layers, names):
    layer_names = [n for n in names if n != "logits"]
    header = ["step", "layer"] + layer_names + (["logits"] if "logits" in names else [])
    rows = []
    for s in range(steps):
        for l in range(max(layers, 1)):
            cells = [_cell(results.get((s, l, n), (None,))[0]) if layers else "" for n in layer_names]
            if "logits" in names:
                cells.append(_cell(results.get((s, None, "logits"), (None,))[0]) if l == max(layers, 1) - 1 else "")
            rows.append([str(s), str(l) if layers else "-"] + cells)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return ["max abs / max rel error (|OTHER - REF| / |REF|) per step, layer and tensor; * = out of tolerance"] + [
        "  ".join(x.rjust(w) for x, w in zip(r, widths)).rstrip() for r in [header] + rows]


def main(argv=None):
    """Entry point; returns the exit status (0 within tolerance, 1 not, 2 bad input)."""
    args = build_parser().parse_args(argv)
    return run_guarded(None, lambda: run(args), args.verbose, PROG)


if __name__ == "__main__":
    sys.exit(main())
