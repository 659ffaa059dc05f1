"""Fuzzing the GGUF reader and converter: any file converts, or fails with an MpitpError and writes nothing.

Two sources of malformed files: a valid small GGUF (written with the gguf package) truncated, with bytes
flipped, or with a count, length, type or offset overwritten by an absurd value; and files assembled here
field by field from drawn parts (magic, version, counts that lie, metadata of every value type with wrong
types and huge lengths, tensor infos with bad dimensions, unknown types and offsets past the end). Any other
exception, a crash or a hang is a bug. A third source must always be refused: the valid file with one tensor's
offset or type changed, so that the tensor data no longer adds up. CI runs MPITP_FUZZ_EXAMPLES (default 300)
per test; ``make fuzz`` runs 10,000.
"""

import atexit
import os
import shutil
import struct
import tempfile

import gguf
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import model_dir
from gguf_util import tensor_fields, write_gguf
from mpitp import MpitpError
from mpitp.tools.convert import convert
from test_convert import _tokenizer_meta

EXAMPLES = int(os.environ.get("MPITP_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 1000,
                suppress_health_check=list(HealthCheck))
WORKDIR = tempfile.mkdtemp(prefix="mpitp-gguf-fuzz-")
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)
VALID = os.path.join(WORKDIR, "valid.gguf")
write_gguf(VALID, model_dir("llama-gqa"), tokenizer=_tokenizer_meta(model_dir("llama-gqa")),
           types=lambda name: "F16" if "attn" in name else "F32")
VALID_BYTES = open(VALID, "rb").read()
# Where the valid file's fields start (counts, keys, value types, lengths, dims, tensor types, offsets): the
# mutations aim there half of the time.
_reader = GGUFReader(VALID)
FIELDS = sorted({f.offset + d for f in [*_reader.fields.values(), *(t.field for t in _reader.tensors)]
                 for d in (0, 8, 12, 16)} | {4, 8, 16})
del _reader
TENSORS = tensor_fields(VALID)  # name -> (where its type is, where its offset is, the offset)
N_VALUES = {t.name: int(t.n_elements) for t in GGUFReader(VALID).tensors}


def _converts_or_fails_cleanly(blob, tokenizer=True, must_fail=False):
    src, out = os.path.join(WORKDIR, "fuzz.gguf"), os.path.join(WORKDIR, "out")
    with open(src, "wb") as f:
        f.write(blob)
    try:
        convert(src, out, tokenizer=tokenizer)
    except MpitpError as e:
        assert str(e) and str(e).isprintable()  # one line
        assert not os.path.exists(out)
    else:
        assert not must_fail, "converted a file whose tensor data does not add up"
        assert sorted(os.listdir(out))[:2] == ["config.json", "generation_config.json"]
        shutil.rmtree(out)
    assert not [p for p in os.listdir(WORKDIR) if ".partial-" in p]


huge = st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1])


@st.composite
def mutated(draw):
    data = bytearray(VALID_BYTES)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cut", "flip", "u64", "u32", "insert"]))
        at = draw(st.one_of(st.sampled_from(FIELDS), st.integers(0, len(data) - 1))) % len(data)
        if kind == "cut":
            del data[at:]
        elif kind == "flip":
            data[at:at + 1] = bytes([draw(st.integers(0, 255))])
        elif kind == "u64":
            data[at:at + 8] = struct.pack("<Q", draw(huge))
        elif kind == "u32":
            data[at:at + 4] = struct.pack("<I", draw(st.one_of(huge.filter(lambda v: v < 2**32),
                                                               st.integers(0, 40))))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            break
    return bytes(data)


@FUZZ
@given(mutated(), st.booleans())
def test_mutated_files(blob, tokenizer):
    _converts_or_fails_cleanly(blob, tokenizer)


def _string(s):
    raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


KEYS = ["general.architecture", "general.alignment", "llama.block_count", "llama.embedding_length",
        "llama.attention.head_count", "llama.context_length", "llama.feed_forward_length",
        "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "x"]
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


@st.composite
def value(draw, depth=0):
    """``(type id, bytes)`` of a metadata value, sometimes of an unknown type or with a length that lies."""
    vtype = draw(st.one_of(st.integers(0, 12), st.integers(13, 2**32 - 1)))
    if vtype in SCALAR:
        return vtype, draw(st.binary(min_size=struct.calcsize(SCALAR[vtype]), max_size=struct.calcsize(SCALAR[vtype])))
    if vtype == 8:
        text = draw(st.one_of(st.sampled_from(["llama", "gpt2", "falcon", ""]), st.text(max_size=8),
                              st.binary(max_size=6)))
        raw = _string(text)
        return 8, raw if draw(st.booleans()) else struct.pack("<Q", draw(huge)) + raw[8:]
    if vtype == 9 and depth == 0:
        items = draw(st.lists(value(depth=1), max_size=4))
        etype = items[0][0] if items else draw(st.integers(0, 13))
        count = len(items) if draw(st.booleans()) else draw(huge)
        return 9, struct.pack("<IQ", etype, count) + b"".join(raw for t, raw in items if t == etype)
    return vtype, draw(st.binary(max_size=8))


@st.composite
def assembled(draw):
    """A GGUF file put together field by field."""
    kvs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), value()), max_size=6))
    if draw(st.booleans()):  # a plausible Llama header first, so that the later checks are reached too
        base = [("general.architecture", (8, _string("llama")))] + [
            (f"llama.{k}", (4, struct.pack("<I", draw(st.sampled_from([v, 0, 1, 3, 2**32 - 1])))))
            for k, v in (("block_count", 1), ("embedding_length", 64), ("attention.head_count", 8),
                         ("context_length", 128), ("feed_forward_length", 176))]
        kvs = base + [("llama.attention.layer_norm_rms_epsilon", (6, struct.pack("<f", 1e-5)))] + kvs
    tensors = draw(st.lists(st.tuples(
        st.one_of(st.sampled_from(["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
                                   "blk.0.attn_norm.weight", "output.weight", "rope_freqs.weight"]),
                  st.text(max_size=4)),
        st.lists(st.one_of(st.integers(0, 64), huge), max_size=5),
        st.one_of(st.sampled_from([0, 1, 2, 3, 8, 30, 6, 14]), st.integers(0, 2**32 - 1)),
        st.one_of(st.sampled_from([0, 32, 64, 100]), huge)), max_size=4))
    often = st.sampled_from([True] * 9 + [False])  # the valid choice, 9 times in 10
    head = b"GGUF" if draw(often) else draw(st.binary(min_size=4, max_size=4))
    head += struct.pack("<I", 3 if draw(often) else draw(st.integers(0, 2**32 - 1)))
    head += struct.pack("<QQ", *(n if draw(often) else draw(huge) for n in (len(tensors), len(kvs))))
    body = b"".join(_string(k) + struct.pack("<I", t) + raw for k, (t, raw) in kvs)
    body += b"".join(_string(n) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", t, off) for n, dims, t, off in tensors)
    blob = head + body
    blob += b"\0" * (-len(blob) % 32) + draw(st.binary(max_size=256))
    return blob[:draw(st.integers(0, len(blob)))] if draw(st.booleans()) else blob


@FUZZ
@given(assembled())
def test_assembled_files(blob):
    _converts_or_fails_cleanly(blob)


def _n_bytes(kind, n_values):
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return None if n_values % block else n_values // block * size


@st.composite
def relocated(draw):
    """The valid file with one tensor's data offset changed (by any amount, or one bit flipped), or its type
    changed to one whose size for its values differs: the tensor data no longer tiles the data section."""
    data = bytearray(VALID_BYTES)
    name = draw(st.sampled_from(sorted(TENSORS)))
    type_at, offset_at, offset = TENSORS[name]
    if draw(st.booleans()):
        new = draw(st.one_of(st.integers(0, 63).map(lambda bit: offset ^ 1 << bit), st.integers(0, 2**64 - 1)))
        data[offset_at:offset_at + 8] = struct.pack("<Q", new if new != offset else offset + 32)
    else:
        n_values = N_VALUES[name]
        old = _n_bytes(gguf.GGMLQuantizationType(struct.unpack_from("<I", data, type_at)[0]).name, n_values)
        kinds = [t for t in gguf.GGML_QUANT_SIZES if _n_bytes(t.name, n_values) != old]
        data[type_at:type_at + 4] = struct.pack("<I", int(draw(st.sampled_from(kinds))))
    return bytes(data)


@FUZZ
@given(relocated())
def test_tensor_data_that_does_not_add_up_is_refused(blob):
    # The structure check alone refuses these: the same values would otherwise convert into a wrong model.
    _converts_or_fails_cleanly(blob, tokenizer=False, must_fail=True)
