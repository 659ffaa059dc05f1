"""The fault catalogue for files that lie: FIFOs, folders and devices where a file should be, a checkpoint that
changes while it is read, NaN and inf weights, failed reads and writes, and config values out of any range.

Through the real command on 2 ranks, each case must end the job with status 2 within 10 seconds, with one line
that names the file, tensor or value (and no traceback): never a hang, never a silent success. What needs a file
to change at an exact moment is tested on the library, in this process.
"""

import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, child_env, model_dir, run_cli, serial_only
from faults_util import LIMIT, base_model, fail_fast, sharded, tensors
from mpitp import CheckpointError, ConfigError, Trace, comm, load_model
from mpitp.checkpoint import Checkpoint, SafetensorsFile
from mpitp.config import config_from_dict
from mpitp.errors import FileError
from st_util import write_safetensors

ARGS = ["--prompt-ids", "1,2,3", "--max-new-tokens", "2"]


def edit_config(path, file="config.json", **changes):
    cfg = json.loads((path / file).read_text())
    (path / file).write_text(json.dumps(dict(cfg, **changes)))
    return path


# --- not a regular file ---------------------------------------------------------------------------------

def _not_regular(name, file, kind, args=ARGS, split=False):
    """The case ``case_<name>``: the model folder (with a two-shard checkpoint if ``split``) whose ``file`` is a
    FIFO, a folder or a device (/dev/zero: a read would never end)."""
    def case(tmp):
        path = base_model(tmp / "m")
        if split:
            sharded(path)
        if os.path.lexists(path / file):
            os.remove(path / file)
        {"FIFO": os.mkfifo, "folder": os.mkdir, "device": lambda p: os.symlink("/dev/zero", p)}[kind](path / file)
        return path, f"{file}: not a regular file but a {kind}", args
    case.__name__ = f"case_{name}"
    return case


case_config_fifo = _not_regular("config_fifo", "config.json", "FIFO")
case_config_device = _not_regular("config_device", "config.json", "device")
case_generation_config_fifo = _not_regular("generation_config_fifo", "generation_config.json", "FIFO")
case_index_fifo = _not_regular("index_fifo", "model.safetensors.index.json", "FIFO", split=True)
case_shard_fifo = _not_regular("shard_fifo", "model-00002-of-00002.safetensors", "FIFO", split=True)
case_safetensors_fifo = _not_regular("safetensors_fifo", "model.safetensors", "FIFO")
# No index here: the message must not say the file is "named in model.safetensors.index.json".
case_safetensors_folder = _not_regular("safetensors_folder", "model.safetensors", "folder")
case_tokenizer_fifo = _not_regular("tokenizer_fifo", "tokenizer.json", "FIFO", ["--prompt", "hello"])
case_tokenizer_config_fifo = _not_regular("tokenizer_config_fifo", "tokenizer_config.json", "FIFO",
                                          ["--prompt", "hello"])


def case_add_bos_token_a_string(tmp):
    (base_model(tmp / "m") / "tokenizer_config.json").write_text('{"add_bos_token": "no"}')  # was taken as true
    return tmp / "m", "tokenizer_config.json: 'add_bos_token' must be true or false, got 'no'", ["--prompt", "hello"]


# --- weights that are not numbers -----------------------------------------------------------------------

def case_nan_weight(tmp):
    path, t = base_model(tmp / "m"), tensors()
    t["transformer.h.0.attn.c_attn.weight"][0, 0] = np.nan  # in W_Q's first head: rank 0 reads it
    write_safetensors(path / "model.safetensors", t)
    return path, ("model.safetensors, tensor 'transformer.h.0.attn.c_attn.weight': has values that are not finite "
                  "(NaN or inf)"), ARGS


def case_inf_in_float16_checkpoint(tmp):
    path = base_model(tmp / "m")
    t = {k: v.astype(np.float16) for k, v in tensors().items()}
    t["transformer.ln_f.weight"][5] = np.inf
    write_safetensors(path / "model.safetensors", t)
    return path, "tensor 'transformer.ln_f.weight': has values that are not finite", ARGS


# --- config values of the wrong kind or out of range ----------------------------------------------------

def case_model_type_list(tmp):
    return edit_config(base_model(tmp / "m"), model_type=["gpt2"]), \
        "config.json: model_type ['gpt2'] is not supported; supported: gemma3_text, gpt2, gpt_neox, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe", ARGS


def case_rope_scaling_string(tmp):
    path = edit_config(base_model(tmp / "m", "llama-gqa"), rope_scaling="llama3")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"]
    (path / "config.json").write_text(json.dumps(cfg))
    return path, "config.json: 'rope_scaling' must be an object (or null), got 'llama3'", ARGS


def case_bos_empty_list(tmp):
    return edit_config(base_model(tmp / "m"), "generation_config.json", bos_token_id=[]), \
        "generation_config.json: 'bos_token_id' is an empty list; give a token id, or null for none", ARGS


def case_eos_huge(tmp):
    return edit_config(base_model(tmp / "m"), "generation_config.json", eos_token_id=10**400), \
        "generation_config.json: 'eos_token_id' must be a token id (an integer from 0 to 2147483648)", ARGS


def case_n_layer_10_to_400(tmp):
    return edit_config(base_model(tmp / "m"), n_layer=10**400), \
        "config.json: 'n_layer' must be a positive integer (at most 2147483648), got 10000000000000000000..." \
        " (401 characters)", ARGS


def case_n_embd_10_to_20(tmp):
    return edit_config(base_model(tmp / "m"), n_embd=10**20, n_head=1), \
        "config.json: 'n_embd' must be a positive integer (at most 2147483648), got 100000000000000000000", ARGS


def case_epsilon_1e400(tmp):
    path = base_model(tmp / "m")
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text.replace('"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": 1e400'))
    return path, "config.json: 'layer_norm_epsilon' must be a positive number (finite), got inf", ARGS


def case_rope_theta_10_to_400(tmp):
    path = base_model(tmp / "m", "llama-gqa")
    edit_config(path, rope_parameters={"rope_type": "default", "rope_theta": 10**400})
    return path, "config.json: 'rope_theta' must be a positive number (finite), got 1000000000", ARGS


def case_integer_of_5000_digits(tmp):
    path = base_model(tmp / "m")
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text.replace('"n_layer": 2', '"n_layer": ' + "9" * 5000))
    return path, "config.json: not readable as JSON (Exceeds the limit (4300 digits)", ARGS


CASES = [case_config_fifo, case_config_device, case_generation_config_fifo, case_index_fifo, case_shard_fifo,
         case_safetensors_fifo, case_safetensors_folder, case_tokenizer_fifo, case_tokenizer_config_fifo,
         case_add_bos_token_a_string,
         case_nan_weight, case_inf_in_float16_checkpoint, case_model_type_list,
         case_rope_scaling_string, case_bos_empty_list, case_eos_huge, case_n_layer_10_to_400,
         case_n_embd_10_to_20, case_epsilon_1e400, case_rope_theta_10_to_400, case_integer_of_5000_digits]


@serial_only
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_files_that_lie_fail_fast_with_one_line(tmp_path, case):
    path, expected, args = case(tmp_path)
    line = fail_fast(["--model", str(path), *args], expected)
    assert "named in" not in line


@serial_only
def test_inf_weight_seen_by_rank_1_only(tmp_path):
    # W_D's rows are split over the ranks: only rank 1 reads its second half, and it speaks for itself.
    path, t = base_model(tmp_path / "m"), tensors()
    t["transformer.h.1.mlp.c_proj.weight"][-2, 3] = -np.inf  # not the last row, which every rank reads
    write_safetensors(path / "model.safetensors", t)
    line = fail_fast(["--model", str(path), *ARGS], "tensor 'transformer.h.1.mlp.c_proj.weight': has values that "
                                                     "are not finite (NaN or inf)")
    assert line.startswith("[rank 1] mpitp: error: ") and line.endswith("diverged in training.")


@serial_only
def test_a_million_layers_are_refused_at_once(tmp_path):
    # The checkpoint has 2 layers; sizing a million used to take 35 s. Memory is refused first (186 GiB), or on
    # a machine that has it, the first missing tensor.
    path = edit_config(base_model(tmp_path / "m"), n_layer=10**6)
    t = time.monotonic()
    r = run_cli(["--model", str(path), *ARGS], n=2, timeout=LIMIT + 5)
    assert time.monotonic() - t < LIMIT and r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and ("GiB" in errors[0] or "'transformer.h.2." in errors[0]), r.stderr


# --- in this process: exact moments -----------------------------------------------------------------------

def test_config_values_of_the_wrong_kind():
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 8, "vocab_size": 10}
    assert config_from_dict(dict(gpt2, eos_token_id=[])).eos_token_ids == ()  # eos [] is: no end-of-sequence
    assert config_from_dict(dict(gpt2, eos_token_id=[3, 4], bos_token_id=[5])).eos_token_ids == (3, 4)
    for changes, message in [({"model_type": {"a": 1}}, "model_type {'a': 1} is not supported"),
                             ({"bos_token_id": []}, "'bos_token_id' is an empty list"),
                             ({"n_layer": 2**31 + 1}, "'n_layer' must be a positive integer (at most 2147483648)"),
                             ({"n_positions": 2.0}, "'n_positions' must be a positive integer"),
                             ({"layer_norm_epsilon": float("nan")}, "must be a positive number (finite), got nan"),
                             ({"eos_token_id": [1, True]}, "'eos_token_id' must be a token id")]:
        with pytest.raises(ConfigError) as e:
            config_from_dict(dict(gpt2, **changes))
        assert message in str(e.value)
    for scaling in ("llama3", 0, [1]):
        with pytest.raises(ConfigError, match="'rope_scaling' must be an object"):
            config_from_dict({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                              "num_hidden_layers": 2, "intermediate_size": 8, "vocab_size": 10,
                              "max_position_embeddings": 8, "rope_scaling": scaling})


def _open_paths():
    return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}


def test_each_checkpoint_file_is_opened_once_and_closed_after_the_load(tmp_path, monkeypatch):
    path = base_model(tmp_path / "m")
    sharded(path)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    model = load_model(str(path), comm.serial(), "float64")
    shards = [p for p in opened if p.endswith(".safetensors")]
    assert sorted(os.path.basename(p) for p in shards) == ["model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"]
    assert not {os.path.realpath(p) for p in shards} & _open_paths()
    reference = load_model(model_dir("gpt2-tiny"), comm.serial(), "float64")
    assert np.array_equal(model.forward([1, 2, 3], model.new_cache(3)),
                          reference.forward([1, 2, 3], reference.new_cache(3)))


def _two_versions(tmp_path):
    old = {"a": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(4096, np.float32)}
    new = {"a": np.full((64, 64), np.nan, np.float32), "b": np.zeros(4096, np.float32)}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, old)
    write_safetensors(tmp_path / "new.safetensors", new)
    return path, old


def test_a_checkpoint_replaced_during_the_load_gives_the_old_values(tmp_path):
    path, old = _two_versions(tmp_path)
    ckpt = Checkpoint(tmp_path)
    first = ckpt.read("a", np.float32)
    os.replace(tmp_path / "new.safetensors", path)  # as a download or a copy tool swaps in a new version
    assert np.array_equal(first, old["a"]) and np.array_equal(ckpt.read("b", np.float32), old["b"])
    assert np.array_equal(ckpt.read("a", np.float32, (slice(3, 9),)), old["a"][3:9])


@pytest.mark.parametrize("change", ["truncated", "truncated and extended", "rewritten in place"])
def test_a_checkpoint_changed_in_place_during_the_load_is_refused(tmp_path, change):
    path, old = _two_versions(tmp_path)
    f = SafetensorsFile(path)
    assert np.array_equal(f.read("a", np.float32), old["a"])
    time.sleep(0.05)  # past the file system's clock tick, so that the change moves the modification time
    data = path.read_bytes()
    with open(path, "r+b") as out:
        if change == "rewritten in place":  # same size: the new file's bytes over the old one's
            out.write((tmp_path / "new.safetensors").read_bytes())
        else:
            out.truncate(len(data) // 2)
            if change == "truncated and extended":
                out.seek(0, os.SEEK_END)
                out.write(np.full(len(data) // 8, np.nan, np.float32).tobytes())
    for name in ("a", "b"):
        with pytest.raises(CheckpointError) as e:
            f.read(name, np.float32)
        assert str(e.value).startswith(f"{path}: the file changed (its size or modification time) while it was "
                                       "being read")


def test_a_failed_read_names_the_file(tmp_path, monkeypatch):
    path, _ = _two_versions(tmp_path)
    ckpt = Checkpoint(tmp_path)

    def eio(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(CheckpointError) as e:
        ckpt.read("a", np.float32)
    assert str(e.value) == f"{path}, tensor 'a': read failed (Input/output error)."
    monkeypatch.setattr(os, "pread", eio)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    assert str(e.value) == f"{path}: read failed (Input/output error)."


@pytest.mark.parametrize("chunk_bytes", [None, 512])
@pytest.mark.parametrize("stored, dtype, bad", [("F32", np.float32, np.nan), ("F32", np.float64, np.inf),
                                                ("BF16", np.float32, -np.inf), ("F16", np.float64, np.nan),
                                                ("F64", np.float32, 1e300)])
def test_non_finite_weights_are_refused_in_every_read_path(tmp_path, monkeypatch, chunk_bytes, stored, dtype, bad):
    # Straight into the destination, through the chunk buffer (cast, widened, transposed), in the last of many
    # chunks; a float64 value too large for float32 would become inf.
    from mpitp import checkpoint
    if chunk_bytes:
        monkeypatch.setattr(checkpoint, "CHUNK_BYTES", chunk_bytes)
    a = (np.arange(48 * 40) % 64).reshape(48, 40) / 4  # exact in every dtype, bfloat16 too
    a[45, 38] = bad
    kinds = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.float32}
    write_safetensors(tmp_path / "model.safetensors", {"w": a.astype(kinds[stored])},
                      bf16={"w"} if stored == "BF16" else ())
    ckpt = Checkpoint(tmp_path)
    for index, transpose in [((), False), ((slice(40, 48), slice(30, 40)), False), ((), True)]:
        block = a[index]
        out = np.empty(block.shape[::-1] if transpose else block.shape, dtype)
        with pytest.raises(CheckpointError, match=r"tensor 'w': has values that are not finite \(NaN or inf\)"):
            ckpt.read_into("w", out, index, transpose)
    assert np.array_equal(ckpt.read("w", dtype, (slice(0, 40),)), a[:40].astype(kinds[stored]).astype(dtype))


def test_large_finite_weights_are_not_refused(tmp_path):
    # Their sum of squares overflows float32 (the fast test), but every value is finite.
    big = np.full((300, 1000), 3e38, np.float32)
    big[1::2] *= -1
    write_safetensors(tmp_path / "model.safetensors", {"w": big})
    assert np.array_equal(Checkpoint(tmp_path).read("w", np.float32), big)


def test_library_errors_for_files_that_are_not_regular(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file but a FIFO"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").mkdir()
    with pytest.raises(FileError, match="config.json: not a regular file but a folder"):
        load_model(str(tmp_path))


# --- trace files ----------------------------------------------------------------------------------------

def _trace(value):
    trace = Trace()
    trace.arrays["step0/logits"] = np.full((64, 1024), value)
    return trace


def test_trace_save_is_atomic_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "rank0.npz"
    _trace(1.0).save(path)

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(FileError) as e:
        _trace(2.0).save(path)
    assert str(e.value).startswith(f"{path}: cannot write the trace (No space left on device)")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["rank0.npz"]  # no temporary left behind
    with np.load(path, allow_pickle=False) as f:
        assert (f["step0/logits"] == 1.0).all()  # the previous trace, whole
    with pytest.raises(FileError, match="no-such-folder/rank0.npz: cannot write the trace \\(No such file"):
        _trace(3.0).save(tmp_path / "no-such-folder" / "rank0.npz")


_WRITER = """
import sys, time
import numpy as np
from mpitp import Trace
trace = Trace()  # a trace of many tensors, as a real one is: its file is written in many pieces
trace.arrays.update({f"step{i}/logits": np.full((16, 1024), float(sys.argv[2])) for i in range(200)})
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # both jobs start writing at the same moment
for _ in range(6):
    trace.save(sys.argv[1])
"""


def test_two_jobs_writing_one_trace_each_leave_a_whole_file(tmp_path):
    # Written in place, the file was corrupt in 6 trials of 6 ("Bad CRC-32").
    path, start = str(tmp_path / "rank0.npz"), time.time() + 1.5
    jobs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(v), str(start)], env=child_env(),
                             cwd=str(REPO)) for v in (1, 2)]
    assert [job.wait(timeout=60) for job in jobs] == [0, 0]
    assert os.listdir(tmp_path) == ["rank0.npz"]
    with np.load(path, allow_pickle=False) as f:
        logits = [f[name] for name in f.files if name.endswith("/logits")]
    assert len(logits) == 200 and np.unique(logits).tolist() in ([1.0], [2.0])


@serial_only
@pytest.mark.parametrize("command, given, expected", [
    (["-m", "mpitp.compare", "{d}", "{d}"], "fifo-trace", "rank0.npz: not a regular file but a FIFO"),
    (["-m", "mpitp.convert", "{f}", "{d}/out"], "fifo", "in: not a regular file but a FIFO"),
    (["-m", "bench", "--summarize", "{f}"], "fifo", "in: not a regular file but a FIFO"),
    (["-m", "bench", "--summarize", "{d}/none.json"], "", "none.json: cannot be opened (No such file or directory)"),
    (["-m", "bench", "--summarize", "{f}"], "{}", "in: not a JSON record of the bench"),
    (["-m", "bench", "--cluster-table", "{f}"], "[1", "in: not a JSON record of the bench (JSONDecodeError)"),
], ids=["compare-fifo", "convert-fifo", "summarize-fifo", "summarize-missing", "summarize-not-a-record",
        "cluster-table-not-json"])
def test_the_tools_refuse_files_that_lie_in_one_line(tmp_path, command, given, expected):
    # A FIFO hung compare, convert and the bench's --summarize; a missing or foreign record was a traceback.
    f = tmp_path / "in"
    if given == "fifo-trace":
        os.mkfifo(tmp_path / "rank0.npz")
    elif given == "fifo":
        os.mkfifo(f)
    elif given:
        f.write_text(given)
    args = [a.format(d=tmp_path, f=f) for a in command]
    t = time.monotonic()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=LIMIT + 5, env=child_env(),
                       cwd=str(REPO))
    assert time.monotonic() - t < LIMIT and r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in r.stderr, r.stderr
