"""What the fault catalogue's files (tests/test_faults*.py) share: a model folder to break, its tensors, and the
check that a command failed fast, with one line naming the cause."""

import os
import shutil
import time

import dense_reference
from conftest import model_dir, run_cli
from st_util import write_sharded

LIMIT = 10  # seconds from the start of a command to the end of the whole job


def base_model(path, name="gpt2-tiny"):
    """A copy of a test model's folder at ``path``, to break."""
    shutil.copytree(model_dir(name), path)
    return path


def tensors(name="gpt2-tiny"):
    return dense_reference.read_safetensors(f"{model_dir(name)}/model.safetensors")


def sharded(path):
    """The model folder ``path`` with its checkpoint split into two shards and an index; the index."""
    os.remove(path / "model.safetensors")
    return write_sharded(path, tensors())


def one_error_line(r, expected, code=2):
    """The job ``r`` ended with status ``code`` (None: any but 0) and one error line, which says ``expected``,
    and no traceback; that line."""
    assert r.returncode == code if code is not None else r.returncode != 0, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    return errors[0]


def fail_fast(args, expected, n=2, code=2):
    """``python -m mpitp.generate ARGS`` on ``n`` ranks ends within ``LIMIT`` seconds as ``one_error_line`` says,
    printing nothing on stdout; the error line."""
    t = time.monotonic()
    r = run_cli(args, n=n, timeout=LIMIT + 5)
    assert time.monotonic() - t < LIMIT, r.stderr
    line = one_error_line(r, expected, code)
    assert r.stdout == "", r.stdout
    return line
