"""``python -m mpitp.generate`` end to end, launched with mpirun in a subprocess under a timeout.

These tests start their own mpirun, so they run in the serial pytest pass and are skipped (on every
rank alike) when pytest itself runs under mpirun.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import REPO, child_env, golden, model_dir, run_cli, serial_only
from mpitp import ConfigError
from mpitp.config import load_config
from mpitp.tokenizer import Tokenizer

pytestmark = serial_only
PROMPT = golden("gpt2-tiny")["prompt_L7"].tolist()
IDS = ",".join(map(str, PROMPT))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_json_contract(n):
    g = golden("gpt2-tiny")
    r = run_cli(["--model", model_dir("gpt2-tiny"), "--prompt-ids", IDS, "--max-new-tokens", "20",
                 "--temperature", "0", "--dtype", "float64", "--json"], n=n)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the only thing on stdout is one JSON object
    assert out["ranks"] == n and out["dtype"] == "float64" and out["model"] == model_dir("gpt2-tiny")
    (seq,) = out["sequences"]
    assert (seq["prompt_ids"], seq["token_ids"], seq["finish_reason"]) == (PROMPT, g["greedy_x64_L7"].tolist(),
                                                                            "length")
    assert seq["text"] == Tokenizer(model_dir("gpt2-tiny")).decode(seq["token_ids"])  # the folder has a tokenizer
    assert out["timing"]["prefill_tokens_per_s"] > 0 and out["timing"]["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("n", [1, 2, 3])
def test_trace_contract(tmp_path, n):
    # Each rank's file holds its own part; the shard metadata puts the parts back together (3 ranks: uneven).
    g = golden("gpt2-tiny")
    r = run_cli(["--model", model_dir("gpt2-tiny"), "--prompt-ids", IDS, "--max-new-tokens", "3",
                 "--dtype", "float64", "--trace", str(tmp_path), "--quiet"], n=n)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"rank{i}.npz" for i in range(n)]
    traces = [np.load(tmp_path / f"rank{rank}.npz", allow_pickle=False) for rank in range(n)]
    for step, expected in ((0, g["logits_x64_L7"]), (1, g["step_logits_x64_L7"][1:2])):
        parts = sorted((int(t["shard/vocab_start"]), t[f"step{step}/logits"]) for t in traces)
        assert np.abs(np.concatenate([p for _, p in parts], axis=1) - expected).max() <= 1e-9
    assert [int(t["shard/head_start"]) for t in traces] == list(np.cumsum([0] + [int(t["shard/n_head_local"])
                                                                                 for t in traces[:-1]]))
    for t in traces:
        heads, ffn = int(t["shard/n_head_local"]), int(t["shard/n_ffn_local"])
        for step, n_seq in ((0, 7), (1, 1), (2, 1)):
            for layer in range(2):
                shapes = {k: t[f"step{step}/layer{layer}/{k}"].shape for k in "ABCDEQKV"}
                assert shapes == {"A": (n_seq, 64), "Q": (n_seq, 16 * heads), "K": (n_seq, 16 * heads),
                                  "V": (n_seq, 16 * heads), "B": (n_seq, 16 * heads),
                                  "C": (n_seq, 64), "D": (n_seq, ffn), "E": (n_seq, 64)}
                assert np.array_equal(t[f"step{step}/layer{layer}/E"], traces[0][f"step{step}/layer{layer}/E"])


GOLDEN_TEXT = str(golden("gpt2-tiny")["text_prompt"])


@pytest.mark.parametrize("n", [1, 2])
def test_text_prompt_through_tokenizer_json_reproduces_hugging_face(n):
    # "Hello, world! mpitp says:" through tokenizer.json, 20 greedy tokens: HF's ids and text.
    g = golden("gpt2-tiny")
    args = ["--model", model_dir("gpt2-tiny"), "--prompt", GOLDEN_TEXT, "--max-new-tokens", "20", "--ignore-eos"]
    r = run_cli(args + ["--json"], n=n)
    assert r.returncode == 0, r.stderr
    seq = json.loads(r.stdout)["sequences"][0]
    assert seq["prompt_ids"] == g["text_prompt_ids"].tolist() and seq["token_ids"] == g["text_greedy_f64"].tolist()
    assert seq["prompt"] == GOLDEN_TEXT and seq["text"] == str(g["text_continuation_f64"])
    # Streamed token by token, the text on stdout is the same: the prompt, the continuation, a newline.
    streamed = run_cli(args, n=n)
    assert streamed.returncode == 0 and streamed.stdout == GOLDEN_TEXT + str(g["text_continuation_f64"]) + "\n"


def test_batch_of_text_prompts_prints_each_text_after_a_blank_line():
    r = run_cli(["--model", model_dir("gpt2-tiny"), "--prompt", GOLDEN_TEXT, "--prompt", "abc", "--max-new-tokens",
                 "5", "--ignore-eos", "--json"], n=2)
    assert r.returncode == 0, r.stderr
    seqs = json.loads(r.stdout)["sequences"]
    plain = run_cli(["--model", model_dir("gpt2-tiny"), "--prompt", GOLDEN_TEXT, "--prompt", "abc",
                     "--max-new-tokens", "5", "--ignore-eos"], n=2)
    assert plain.stdout == "\n\n".join(s["prompt"] + s["text"] for s in seqs) + "\n"


def test_default_model_sorts_digits():
    # No arguments at all: the bundled digit sorter answers its sample prompts, at 2 ranks.
    r = run_cli([], n=2)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.removesuffix("\n").split("\n\n")  # one line per prompt, a blank line between
    assert len(lines) == 4 and r.stdout.count("\n") == 7
    for line in lines:
        prompt, answer = line.split("=")
        assert answer == "".join(sorted(prompt.removeprefix("sort:")))


def _one_error_line(r, expected):
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_file_given_as_the_model_says_what_to_give(tmp_path):
    gguf, safetensors = tmp_path / "smol.bin", tmp_path / "model.safetensors"
    gguf.write_bytes(b"GGUF" + bytes(20))  # a GGUF file by its first bytes, whatever its name
    safetensors.write_bytes(bytes(8))
    r = run_cli(["--model", str(gguf), "--prompt", "a"], n=2, timeout=60)
    assert r.returncode == 2
    _one_error_line(r, f"mpitp: error: {gguf}: a GGUF file, not a model folder: convert it once with `python -m "
                       f"mpitp.convert {gguf} OUT_DIR`, then give --model OUT_DIR.")
    with pytest.raises(ConfigError, match="a safetensors file, not a model folder: give the folder that holds it"):
        load_config(safetensors)


def test_more_ranks_than_heads_is_refused_once_with_the_limit():
    r = run_cli(["--model", model_dir("gpt2-tiny"), "--prompt-ids", "1"], n=5, timeout=60)
    assert r.returncode == 2
    _one_error_line(r, "cannot run this model on 5 ranks (mpirun -n 5): each rank needs at least one of its 4 "
                       "attention heads; use -n 1 to 4.")


def test_request_beyond_context_is_refused():
    r = run_cli(["--model", model_dir("gpt2-tiny"), "--prompt-ids", IDS, "--max-new-tokens", "122"], n=2,
                timeout=60)
    assert r.returncode == 2
    _one_error_line(r, "the prompt (7 tokens) plus max-new-tokens (122) is 129 tokens, more than the model's "
                       "context of 128.")


@pytest.mark.parametrize("args, expected", [
    (["--model", "/nonexistent"], "/nonexistent: model folder not found"),
    (["--prompt-ids", "1,2,999"], "token id 999 is outside the vocabulary 0..255"),
    (["--prompt", ""], "a prompt is empty"),
    (["--prompt", "a", "--prompt-ids", "1"], "either as text (--prompt) or as token ids (--prompt-ids), not both"),
    (["--prompt", "a", "--max-new-tokens", "-3"], "max-new-tokens must be an integer >= 0, got -3"),
    (["--prompt", "a", "--temperature", "-1"], "temperature must be 0 (greedy) or a finite number >= 1e-06"),
    (["--prompt", "a", "--temperature", "nan"], "temperature must be 0 (greedy) or a finite number >= 1e-06"),
    (["--prompt-ids", "1,,2"], "expected comma-separated integers (of up to 18 digits) like 15,7,201, got '1,,2'"),
    (["--prompt-ids", "\u0661"], "expected comma-separated integers"),  # an Arabic-Indic digit
    (["--prompt-ids", "1_0"], "expected comma-separated integers (of up to 18 digits) like 15,7,201, got '1_0'"),
    (["--prompt-ids", "1" * 30], "expected comma-separated integers (of up to 18 digits)"),
    (["--prompt-ids", "1" * 5000], "got '" + "1" * 60 + "...'"),
    (["--prompt", "a", "--top-k", "-5"], "top-k must be an integer >= 0"),
    (["--prompt", "a", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--prompt", "a", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["--prompt", "a", "--seed", "-1"], "seed must be an integer >= 0"),
    (["--prompt", "a", "--seed", str(2**64)],  # it silently equalled seed 0
     "seed must be an integer >= 0 and < 2**64 (0 to 18446744073709551615), got 18446744073709551616."),
    (["--prompt", "a", "--threads", "0"], "--threads must be >= 1"),
    ([], "no prompt: give --prompt TEXT"),
])
def test_bad_input_is_one_clear_line(args, expected):
    if "--model" not in args:
        args = ["--model", model_dir("gpt2-tiny"), *args]
    r = run_cli(args, n=2, timeout=60)
    assert r.returncode == 2
    _one_error_line(r, expected)


@pytest.mark.parametrize("n", [2, 4])
def test_blas_threads_per_rank_share_the_node(n):
    # The node's cores shared among its ranks (make test-cluster: n ranks over MPITP_CLUSTER_NODES nodes).
    per_node = n // int(os.environ.get("MPITP_CLUSTER_NODES", "1"))
    r = run_cli(["--prompt-ids", "1,2", "--max-new-tokens", "1"], n=n, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"BLAS threads per rank: {max(1, len(os.sched_getaffinity(0)) // per_node)};" in r.stderr


def test_quiet_is_quiet_even_about_oversubscribed_cores():
    args = ["--prompt-ids", "1,2", "--max-new-tokens", "1", "--threads", "100000"]  # more than any node's cores
    loud, quiet = run_cli(args, n=2, timeout=60), run_cli(args + ["--quiet"], n=2, timeout=60)
    assert loud.returncode == quiet.returncode == 0 and "mpitp: warning: " in loud.stderr, loud.stderr
    assert quiet.stderr == "" and quiet.stdout == loud.stdout


def test_help():
    r = run_cli(["--help"])
    assert r.returncode == 0 and "--prompt-ids" in r.stdout and "--trace" in r.stdout


def test_an_editable_install_is_imported_beside_the_clone_folder(tmp_path):
    # The README's example saved in the folder that holds the clone `mpitp/` (no __init__.py at its top): the
    # editable install that `pip install -e .` builds (setuptools' own PEP 660 hook, here without pip) must win.
    build_meta = "import sys, setuptools.build_meta as b; print(b.build_editable(sys.argv[1]))"
    clone, site = tmp_path / "mpitp", tmp_path / "site"
    shutil.copytree(REPO / "mpitp", clone / "mpitp", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, clone)
    r = subprocess.run([sys.executable, "-c", build_meta, str(tmp_path)], cwd=clone, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    zipfile.ZipFile(tmp_path / r.stdout.split()[-1]).extractall(site)
    (tmp_path / "example.py").write_text("import importlib.util, site, sys\nsite.addsitedir(sys.argv[1])\n"
                                         "print(importlib.util.find_spec('mpitp').origin)\n")
    # -S -E: no site-packages, no PYTHONPATH: only the script's folder and the install above can answer
    r = subprocess.run([sys.executable, "-S", "-E", str(tmp_path / "example.py"), str(site)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(clone / "mpitp" / "__init__.py"), r.stdout + r.stderr


def test_without_mpi4py_one_line_says_what_to_install():
    blocked = "import sys; sys.modules['mpi4py'] = None; from mpitp.cli.generate import main; sys.exit(main([]))"
    r = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60,
                       env=child_env(), cwd=str(REPO))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mpitp: error: mpi4py does not work in ") and "`pip install mpi4py mpich`" in r.stderr


def _generate_into(stdout, *args):
    """The generate command on one rank with ``stdout`` as its standard output."""
    return subprocess.run([sys.executable, "-m", "mpitp.generate", "--model", model_dir("gpt2-tiny"), "--prompt-ids",
                           IDS, "--max-new-tokens", "5", *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=120, env=child_env(), cwd=str(REPO))


@pytest.mark.parametrize("args", [[], ["--json"]])
def test_a_result_that_cannot_be_written_is_an_error(args):
    # Before: with stdout closed (>&-) the result was dropped and the status was 0; a full disk or a reader that
    # had gone gave "unexpected error", status 1.
    closed = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "mpitp.generate", "--model",
                             model_dir("gpt2-tiny"), "--prompt-ids", IDS, *args], stderr=subprocess.PIPE, text=True,
                            timeout=120, env=child_env(), cwd=str(REPO))
    assert (closed.returncode, closed.stderr) == (2, "mpitp: error: stdout is closed, so the result would be lost; "
                                                     "send it to a file (> out.txt) instead.\n")
    with open("/dev/full", "w") as full:
        r = _generate_into(full, "--quiet", *args)
    assert (r.returncode, r.stderr) == (2, "mpitp: error: stdout: cannot write the result (No space left on "
                                           "device); it is lost.\n")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as with `| head -c 0`
    try:
        r = _generate_into(write, "--quiet", *args)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (141, "")  # quiet, like any tool a closed pipe ends; never 0
