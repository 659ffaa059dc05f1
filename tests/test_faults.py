"""The fault catalogue: every class of bad input or failure, through the real command on 2 ranks.

Each case must end the whole job with a non-zero status within 10 seconds, with one line that names the
cause (and no traceback unless --verbose): never a hang, never a silent success.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, child_env, model_dir, mpirun, run_cli, serial_only
from faults_util import LIMIT, base_model, fail_fast, sharded, tensors
from st_util import corrupt, header_and_data, write_raw, write_safetensors

pytestmark = serial_only

def case_missing_folder(tmp):
    return tmp / "nowhere", "nowhere: model folder not found"


def case_config_missing(tmp):
    os.remove(base_model(tmp / "m") / "config.json")
    return tmp / "m", "config.json: file not found"


def case_config_not_json(tmp):
    (base_model(tmp / "m") / "config.json").write_text("{'model_type': gpt2")
    return tmp / "m", "config.json: not readable as JSON"


def case_unknown_model_type(tmp):
    path = base_model(tmp / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    return path, "model_type 'bert' is not supported; supported: gemma3_text, gpt2, gpt_neox, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe"


def case_tensor_missing(tmp):
    path = base_model(tmp / "m")
    t = tensors()
    del t["transformer.h.1.attn.c_proj.weight"]
    write_safetensors(path / "model.safetensors", t)
    return path, "tensor 'transformer.h.1.attn.c_proj.weight': tensor is missing"


def case_tensor_wrong_shape(tmp):
    path = base_model(tmp / "m")
    t = tensors()
    t["transformer.h.0.mlp.c_fc.weight"] = np.zeros((64, 128), np.float32)
    write_safetensors(path / "model.safetensors", t)
    return path, "shape [64, 128] does not match config.json, which implies [64, 256]"


def case_tensor_unsupported_dtype(tmp):
    path = base_model(tmp / "m")
    header, data = header_and_data(tensors())
    header["transformer.ln_f.weight"]["dtype"] = "I32"  # same byte length, not a float dtype
    write_raw(path / "model.safetensors", header, data)
    return path, "dtype I32 is not a floating-point weight dtype"


def case_shard_missing(tmp):
    path = base_model(tmp / "m")
    sharded(path)
    os.remove(path / "model-00002-of-00002.safetensors")
    return path, "model-00002-of-00002.safetensors: shard file not found"


def case_shard_truncated(tmp):
    path = base_model(tmp / "m")
    sharded(path)
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return path, "model-00001-of-00002.safetensors"


def case_shard_escapes_folder(tmp):
    path = base_model(tmp / "m")
    index = sharded(path)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../etc/passwd"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path, "lies outside the model folder"


def case_pickle_only(tmp):
    path = tmp / "m"
    path.mkdir()
    shutil.copy(f"{model_dir('gpt2-tiny')}/config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return path, "pytorch_model.bin: pickle checkpoints are refused"


def case_request_exhausts_memory(tmp):
    # A context of 2**31 positions: the KV cache of the request would need far more memory than exists.
    path = base_model(tmp / "m")
    with open(f"{model_dir('llama-gqa')}/config.json") as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 2**31
    shutil.copy(f"{model_dir('llama-gqa')}/model.safetensors", path)
    (path / "config.json").write_text(json.dumps(cfg))
    return path, "needs", ["--prompt-ids", "1,2,3", "--max-new-tokens", str(2**31 - 100)]


CASES = [case_missing_folder, case_config_missing, case_config_not_json, case_unknown_model_type,
         case_tensor_missing, case_tensor_wrong_shape, case_tensor_unsupported_dtype, case_shard_missing,
         case_shard_truncated, case_shard_escapes_folder, case_pickle_only, case_request_exhausts_memory]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_bad_model_input_fails_fast_with_one_line(tmp_path, case):
    path, expected, *extra = case(tmp_path)
    fail_fast(["--model", str(path), *(extra[0] if extra else ["--prompt-ids", "1,2,3"])], expected)


HEADER_CLASSES = ["header beyond file", "header above cap", "offsets outside data", "overlap", "hole",
                  "trailing bytes", "shape mismatch", "unknown dtype", "not json", "not an object"]


@pytest.mark.parametrize("kind", HEADER_CLASSES)
def test_malformed_header_fails_fast_with_one_line(tmp_path, kind):
    path = base_model(tmp_path / "m")
    write_raw(path / "model.safetensors", *corrupt(kind))
    fail_fast(["--model", str(path), "--prompt-ids", "1,2,3"], "model.safetensors")


@pytest.mark.parametrize("phase", ["load", "prefill", "decode"])
def test_exception_on_one_rank_aborts_everyone(phase):
    t = time.monotonic()
    r = run_cli(["--max-new-tokens", "5", "--prompt-ids", "1,2,3", "--ignore-eos"], n=2, timeout=LIMIT + 5,
                inject=f"1:{phase}")
    assert time.monotonic() - t < LIMIT and r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("[rank 1] mpitp: unexpected error")]
    assert len(lines) == 1 and f"during {phase}" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_bad_input_seen_by_one_rank_only():
    # e.g. a file missing on one node: that rank speaks for itself, and every rank exits cleanly.
    t = time.monotonic()
    r = run_cli([], n=2, timeout=LIMIT + 5, inject="1:input")
    assert time.monotonic() - t < LIMIT and r.returncode == 2
    assert r.stderr.strip().splitlines() == ["[rank 1] mpitp: error: fault injected on this rank during input"]


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_to_mpirun_ends_every_rank(tmp_path, sig, code, said):
    # A long generation, interrupted (Ctrl-C) or terminated (what Slurm's scancel sends): every rank exits with
    # mpitp's own line, nothing is left running.
    from random_models import write_random_model
    write_random_model(tmp_path / "long", "llama-mqa", max_position_embeddings=60000, hidden_size=192,
                       intermediate_size=512)
    marker = str(tmp_path / "long")
    proc = subprocess.Popen([*mpirun(2), sys.executable, "-m", "mpitp.generate", "--model", marker,
                             "--prompt-ids", "1,2,3", "--max-new-tokens", "50000", "--ignore-eos", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=str(REPO), start_new_session=True)
    time.sleep(3)
    assert proc.poll() is None, f"the generation ended before it could be interrupted: {proc.stderr.read()}"
    t = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - t < LIMIT and proc.returncode == code and f"mpitp: {said}" in err, err
    assert "BAD TERMINATION" not in err
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left running: {left}"


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_trace_replaces_only_a_regular_file(tmp_path, kind):
    # A FIFO or a link where rank 0's trace goes: refused before the work, in one line; nothing written.
    target = tmp_path / "rank0.npz"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        (tmp_path / "elsewhere.npz").write_bytes(b"x")
        target.symlink_to(tmp_path / "elsewhere.npz")
    what = {"fifo": "a FIFO", "symlink": "a symbolic link"}[kind]
    fail_fast(["--model", model_dir("gpt2-tiny"), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--trace",
               str(tmp_path)], f"rank0.npz is {what}, not a regular file; mpitp replaces only regular files")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["elsewhere.npz"] if kind == "symlink" else []) + [
        "rank0.npz"]
    assert kind == "fifo" or (tmp_path / "elsewhere.npz").read_bytes() == b"x"


def test_a_device_is_never_replaced():
    # As root, an output named /dev/null would have replaced the system's /dev/null with a regular file.
    from mpitp.cli.runner import check_writable
    from mpitp.errors import MpitpError
    with pytest.raises(MpitpError, match="/dev/null is a character device, not a regular file"):
        check_writable("/dev/null", "--trace-file /dev/null")


def test_a_trace_whose_destination_became_a_fifo_is_not_written_and_leaves_no_temporary(tmp_path):
    # Checked again at the rename: something put there during the run is not replaced either.
    from mpitp import Trace
    from mpitp.errors import FileError
    trace = Trace()
    trace.arrays["x"] = np.zeros(3)
    os.mkfifo(tmp_path / "rank0.npz")
    with pytest.raises(FileError, match="rank0.npz: is not a regular file"):
        trace.save(tmp_path / "rank0.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["rank0.npz"]
