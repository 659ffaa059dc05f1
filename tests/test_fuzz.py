"""Fuzzing the checkpoint reader: any file and any index raise CheckpointError or read correctly.

Generated safetensors files mix well-formed and broken parts (header length, JSON, entries, dtypes, shapes,
offsets, data length), and generated index files mix valid and hostile shard names. The reader may accept a
file or raise ``CheckpointError``; any other exception, a crash or a hang is a bug. CI runs a short budget
(MPITP_FUZZ_EXAMPLES, default 300 per test); ``make fuzz`` runs 10,000.
"""

import atexit
import json
import os
import shutil
import struct
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpitp import CheckpointError
from mpitp.checkpoint import Checkpoint, SafetensorsFile

EXAMPLES = int(os.environ.get("MPITP_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 1000,
                suppress_health_check=list(HealthCheck))
WORKDIR = tempfile.mkdtemp(prefix="mpitp-fuzz-")
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=6))
json_any = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), c, max_size=3)),
                        max_leaves=6)
dtype = st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3"]),
                  st.text(max_size=4), json_any)
shape = st.one_of(st.lists(st.integers(-3, 12), max_size=3), json_any)
offsets = st.one_of(st.lists(st.integers(-8, 300), min_size=2, max_size=2),
                    st.lists(st.integers(-2**65, 2**65), max_size=3), json_any)
entry = st.one_of(st.fixed_dictionaries({"dtype": dtype, "shape": shape, "data_offsets": offsets}), json_any)
header = st.one_of(st.dictionaries(st.text(max_size=6), entry, max_size=4),
                   st.dictionaries(st.just("__metadata__"), json_any, max_size=1), json_any)


def _consistent(draw_header, data_len):
    """Make a share of the entries line up, so that the deeper checks and the reads are reached too."""
    if not isinstance(draw_header, dict):
        return draw_header
    cursor, out = 0, {}
    for name, e in draw_header.items():
        if isinstance(e, dict) and isinstance(e.get("shape"), list) and e.get("dtype") in ("F32", "F16", "BF16") \
                and all(isinstance(d, int) and 0 <= d <= 12 for d in e["shape"]):
            size = int(np.prod(e["shape"], dtype=np.int64)) * {"F32": 4, "F16": 2, "BF16": 2}[e["dtype"]]
            e = dict(e, data_offsets=[cursor, cursor + size])
            cursor += size
        out[name] = e
    return out


@st.composite
def safetensors_bytes(draw):
    data = draw(st.binary(max_size=300))
    h = draw(header)
    if draw(st.booleans()):
        h = _consistent(h, len(data))
    raw = draw(st.one_of(st.just(json.dumps(h).encode()), st.binary(max_size=60)))
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1), st.integers(0, len(raw) + 8)))
    body = struct.pack("<Q", length) + raw + data
    return draw(st.one_of(st.just(body), st.just(body[:draw(st.integers(0, len(body)))])))


@FUZZ
@given(safetensors_bytes())
def test_reader_accepts_or_raises_checkpoint_error(blob):
    path = os.path.join(WORKDIR, "model.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    try:
        st_file = SafetensorsFile(path)
    except CheckpointError:
        return
    for name, (_, shp, _, _) in st_file.entries.items():
        try:
            whole = st_file.read(name, np.float32)
            assert whole.shape == shp
            if len(shp) == 2 and shp[0] and shp[1]:
                assert np.array_equal(st_file.read(name, np.float32, (slice(0, 1), slice(1, None))),
                                      whole[0:1, 1:], equal_nan=True)
        except CheckpointError:
            pass


@FUZZ
@given(st.one_of(json_any, st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=4), st.one_of(st.sampled_from(["a.safetensors", "../x.safetensors", "/etc/passwd", "",
                                                    ".", "sub/../a.safetensors"]), st.text(max_size=8), json_any),
    max_size=3)})))
def test_index_accepts_or_raises_checkpoint_error(index):
    folder = os.path.join(WORKDIR, "model")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "a.safetensors"), "wb") as f:  # a valid file with one tensor "t"
        h = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        f.write(struct.pack("<Q", len(h)) + h + np.ones(2, np.float32).tobytes())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    try:
        ckpt = Checkpoint(folder)
    except CheckpointError:
        return
    for name in ckpt.names():
        assert np.array_equal(ckpt.read(name, np.float32), [1, 1])
