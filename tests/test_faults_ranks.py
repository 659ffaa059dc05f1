"""The fault catalogue, part 2: ranks that disagree, requests that do not fit, values that cannot work.

Each case launches the real command on 2 ranks, most with different arguments per rank (``mpirun -n 1 A : -n 1
B``, as a stale model copy on one node or a mistaken launch gives): the job must end within 10 seconds with
status 2 and one line naming the rank and what differs, never a hang or a silent wrong result.
"""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, child_env, model_dir, mpirun, run_cli, serial_only
from faults_util import LIMIT, fail_fast, one_error_line
from random_models import write_random_model
from st_util import write_safetensors
import dense_reference

pytestmark = serial_only
PROMPT = ["--prompt-ids", "1,2,3", "--max-new-tokens", "4"]


def mpmd(a, b, module="mpitp.generate"):
    """Rank 0 runs ``python -m module`` (the generate command) with arguments ``a``, rank 1 with ``b``."""
    cmd = [sys.executable, "-m", module]
    launcher = mpirun(1)  # mpirun -n 1
    t = time.monotonic()
    r = subprocess.run([*launcher, *cmd, *a, ":", "-n", "1", *cmd, *b], capture_output=True, text=True,
                       timeout=LIMIT + 5, env=child_env(), cwd=str(REPO))
    assert time.monotonic() - t < LIMIT, r.stderr
    return r


def other_model(tmp_path, **changes):
    return str(write_random_model(tmp_path / "other", "gpt2-6h", **changes))


@pytest.mark.parametrize("a, b, expected", [
    (PROMPT + ["--max-new-tokens", "20"], PROMPT + ["--max-new-tokens", "5"], "rank 1 differs from rank 0 in its "
     "--max-new-tokens: 5 against 20"),
    (PROMPT + ["--trace", "TMP"], PROMPT, "--trace (given or not): False against True"),
    (PROMPT + ["--temperature", "1"], PROMPT + ["--temperature", "0.5"], "--temperature: 0.5 against 1.0"),
    (PROMPT + ["--top-k", "5"], PROMPT, "--top-k: 0 against 5"),
    (PROMPT + ["--seed", "1"], PROMPT, "--seed: 0 against 1"),
    (PROMPT, ["--prompt-ids", "1,2,4", "--max-new-tokens", "4"], "prompt token ids"),
    (PROMPT + ["--ignore-eos"], PROMPT, "--ignore-eos: False against True"),
    (PROMPT, PROMPT + ["--dtype", "float64"], "--dtype: float64 against float32"),
    (PROMPT, PROMPT + ["--help"], "rank 1 was given --help where rank 0 was given a valid command line"),
    (PROMPT, PROMPT + ["--bogus"], "rank 1 was given a bad command line"),
], ids=["max-new-tokens", "trace-on-rank-0-only", "temperature", "top-k-on-rank-0-only", "seed", "prompt",
        "ignore-eos", "dtype", "help-on-rank-1", "usage-error-on-rank-1"])
def test_ranks_given_different_requests_refuse_together(tmp_path, a, b, expected):
    a = [str(tmp_path / "trace") if x == "TMP" else x for x in a]
    r = mpmd(a, b)
    one_error_line(r, expected)
    assert r.stdout == "" and not (tmp_path / "trace").exists()


@pytest.mark.parametrize("changes", [dict(n_layer=3), dict(n_embd=36), dict(vocab_size=101), dict(),
                                     dict(seed=1)],
                         ids=["layers", "width", "vocabulary", "same-shapes-other-name", "same-headers-other-values"])
def test_ranks_that_loaded_different_models_refuse_together(tmp_path, changes):
    # A stale copy on one node: the same command line, another model folder on rank 1.
    base = str(write_random_model(tmp_path / "base", "gpt2-6h"))
    other = other_model(tmp_path, **changes)
    if not changes:  # identical shapes, one tensor added to the checkpoint: the headers differ
        tensors = dense_reference.read_safetensors(f"{other}/model.safetensors")
        tensors["extra.weight"] = np.zeros(1, np.float32)
        write_safetensors(f"{other}/model.safetensors", tensors)
    r = mpmd(["--model", base] + PROMPT, ["--model", other] + PROMPT)
    one_error_line(r, "rank 1 differs from rank 0 in its model (digest of config.json, the checkpoint headers and each weight's first and last rows)")
    assert r.stdout == ""


BENCH = ["--preset", "tiny", "-r", "1", "-p", "8", "-n", "4", "--roofline-mib", "16", "--batch", "1"]


@pytest.mark.parametrize("b, expected", [
    (["--help"], "bench: error: rank 1 was given --help where rank 0 was given a valid command line"),
    (["--bogus"], "bench: error: rank 1 was given a bad command line"),
    (["-n", "8"], "bench: error: rank 1 differs from rank 0 in its --n-gen: 8 against 4"),
    (["--osu"], "bench: error: rank 1 differs from rank 0 in its --osu: True against False"),
    (["--preset", "gpt2-124m"], "bench: error: rank 1 differs from rank 0 in its --preset: gpt2-124m against tiny"),
], ids=["help", "usage-error", "n-gen", "osu", "preset"])
def test_bench_ranks_given_different_arguments_refuse_together(b, expected):
    # These hung, exited 0 with a report, or printed MPI's truncation stacks.
    r = mpmd(BENCH, BENCH + b, module="bench")
    one_error_line(r, expected)


def test_the_same_model_in_two_folders_is_accepted(tmp_path):
    # Each node's own copy at its own path: what is compared is the content, not the path.
    shutil.copytree(model_dir("gpt2-tiny"), tmp_path / "copy")
    r = mpmd(["--model", model_dir("gpt2-tiny")] + PROMPT, ["--model", str(tmp_path / "copy")] + PROMPT)
    assert r.returncode == 0 and "generated ids" in r.stdout, r.stderr


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--temperature", "1e-320"], "temperature must be 0 (greedy) or a finite number >= 1e-06, got "
                 "1e-320", id="tiny-temperature"),
    pytest.param(["--trace", ""], "--trace needs a folder name", id="empty-trace"),
    pytest.param(["--trace", "/proc/mpitp-trace"], "--trace /proc/mpitp-trace: cannot write in /proc",
                 id="unwritable-trace"),
    pytest.param(["--trace", "README.md"], "--trace README.md: cannot write in", id="trace-is-a-file"),
    pytest.param(["--prompt", "sort:1\udcff2="], "a prompt is not valid UTF-8 (byte 0xff at character 6)",
                 id="invalid-utf8-prompt"),
])
def test_values_that_cannot_work_are_refused(args, expected):
    fail_fast(args + ([] if "--prompt" in args else PROMPT), expected)


def test_a_huge_top_k_is_every_token(tmp_path):
    # --top-k 10^9 on a 97-token vocabulary is no limit: the same tokens, at once, not k rows per rank.
    path = str(write_random_model(tmp_path / "m", "gpt2-6h"))
    args = ["--model", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "16", "--temperature", "1", "--seed", "3"]
    t = time.monotonic()
    huge, plain = run_cli(args + ["--top-k", "1000000000"], n=2), run_cli(args, n=2)
    assert time.monotonic() - t < 2 * LIMIT
    assert huge.returncode == plain.returncode == 0 and huge.stdout == plain.stdout, huge.stderr


@pytest.mark.parametrize("where", ["logits", "norm"])
def test_activations_that_overflow_are_refused(tmp_path, where):
    # Finite weights whose activations overflow float32: one clear line, status 2; in float64 the same model runs.
    # "norm": a norm's variance overflows, which used to give finite garbage tokens and exit 0.
    path = str(write_random_model(tmp_path / "m", "llama-9h"))
    tensors = dense_reference.read_safetensors(f"{path}/model.safetensors")
    if where == "logits":
        tensors["model.norm.weight"][:] = 1e30  # logits of about 1e40: beyond float32 (3.4e38)
        tensors["lm_head.weight"] *= 1e10
    else:
        tensors["model.embed_tokens.weight"] *= 3e37
    write_safetensors(f"{path}/model.safetensors", tensors)
    args = ["--model", path] + PROMPT
    t = time.monotonic()
    r = run_cli(args, n=2, timeout=LIMIT + 5)
    assert time.monotonic() - t < LIMIT
    one_error_line(r, "mpitp: error: the model's activations overflow float32 (overflow encountered in ")
    assert "RuntimeWarning" not in r.stderr and r.stdout == ""
    assert run_cli(args + ["--dtype", "float64"], n=2).returncode == 0


def test_a_trace_too_large_for_the_node_is_refused_before_the_run(monkeypatch, capsys):
    # --trace keeps every layer's tensors of every token: about 1.3 MB here, more than the 1 MB said to be free
    # (the weights, 0.5 MB, and the KV cache, 0.1 MB, fit). Long prompts with --trace were OOM kills.
    from mpitp.cli import generate
    monkeypatch.setattr("mpitp.resources.available_bytes", lambda: 1 << 20)
    code = generate.main(["--model", model_dir("gpt2-tiny"), "--prompt-ids", ",".join(["5"] * 90),
                          "--max-new-tokens", "10", "--trace", "/tmp/never-written"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == ["mpitp: error: --trace of 100 tokens needs 1.3 MiB but this "
                                                      "node has 1.0 MiB available; trace fewer or shorter prompts, "
                                                      "or use more ranks."], err
    assert not os.path.exists("/tmp/never-written")


def test_a_trace_file_that_is_a_folder_is_refused_before_the_run(tmp_path):
    (tmp_path / "rank1.npz").mkdir()  # rank 1's file: found after the whole run, before
    r = run_cli(["--trace", str(tmp_path)] + PROMPT, n=2, timeout=LIMIT + 5)
    one_error_line(r, f"[rank 1] mpitp: error: --trace {tmp_path}: {tmp_path}/rank1.npz is a folder.")
    assert r.stdout == "" and not (tmp_path / "rank0.npz").exists()
