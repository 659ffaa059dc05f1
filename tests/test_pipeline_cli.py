"""``generate --pp`` under mpirun: the same text as without stages at 1x2, 1x3, 2x2; layouts that cannot work
refused in one line; and the fault catalogue for stages: a stage that fails, dies or stalls ends the whole job
within seconds, with one line where mpitp can still speak."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, child_env, mpirun, run_cli, serial_only
from faults_util import LIMIT, fail_fast, one_error_line
from random_models import write_random_model
from test_faults_ranks import mpmd

pytestmark = serial_only
ARGS = ["--prompt-ids", "3,1,4,1,5", "--prompt-ids", "9,2", "--prompt-ids", "6,5,3,5,8,9,7", "--max-new-tokens", "8",
        "--ignore-eos", "--json", "--quiet"]


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    # 5 layers: 2 and 3 stages do not divide them
    return write_random_model(tmp_path_factory.mktemp("pp") / "m", "llama-9h", num_hidden_layers=5)


@pytest.mark.parametrize("n, extra", [(2, ["--pp", "2"]), (3, ["--pp", "3"]), (4, ["--pp", "2"]),
                                      (3, ["--pp-layers", "1,3,1"]), (2, ["--pp-layers", "5"])],
                         ids=["1x2", "1x3", "2x2", "1x3-given", "one-stage"])
def test_stages_generate_what_one_rank_generates(five_layers, n, extra):
    # one stage of every layer is no pipeline: before, it ended in MPI's "Invalid rank" abort
    args = ["--model", five_layers, "--dtype", "float64", *ARGS]
    alone, staged = run_cli(args), run_cli(args + extra, n=n)
    assert alone.returncode == staged.returncode == 0, staged.stderr
    a, s = json.loads(alone.stdout), json.loads(staged.stdout)
    assert a["sequences"] == s["sequences"] and len(s["sequences"]) == 3
    pp = len(extra[1].split(",")) if extra[0] == "--pp-layers" else int(extra[1])
    assert (a["pp"], s["pp"], s["ranks"]) == (1, pp, n)


def test_the_layout_is_said(five_layers):
    # The LM head and the final norm weigh a little more than the embedding: the first stage takes the odd layer.
    r = run_cli(["--model", five_layers, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--pp", "2"], n=2)
    assert r.returncode == 0 and "; pipeline: 2 stages of 1 rank, layers 3,2" in r.stderr, r.stderr


@pytest.mark.parametrize("n, extra, expected", [
    (2, ["--pp", "3"], "mpitp: error: --pp 3: 2 ranks (mpirun -n 2) cannot form 3 pipeline stages of equally many "
                       "ranks; use --pp 1, 2."),
    (3, ["--pp", "2"], "cannot form 2 pipeline stages of equally many ranks; use --pp 1, 3."),
    (2, ["--pp", "0"], "--pp 0: 2 ranks (mpirun -n 2) cannot form 0 pipeline stages"),
    (2, ["--pp-layers", "2,2"], "mpitp: error: --pp-layers 2,2: give 2 counts of at least 1 layer each (one per "
                                "stage), summing to the model's 3 layers."),
    (2, ["--pp", "2", "--pp-layers", "1,1,1"], "--pp-layers 1,1,1: give 2 counts"),
], ids=["more-stages-than-ranks", "not-a-divisor", "zero", "layers-do-not-sum", "counts-and-stages-differ"])
def test_layouts_that_cannot_work_are_refused(n, extra, expected):
    fail_fast(["--prompt-ids", "1,2,3", *extra], expected, n=n)


def test_more_stages_than_layers_is_refused(tmp_path):
    path = write_random_model(tmp_path / "m", "gpt2-6h")  # 2 layers, 4 ranks
    fail_fast(["--model", path, "--prompt-ids", "1,2", "--pp", "4"], "mpitp: error: --pp 4: more pipeline stages "
              "than the model's 2 layers; use --pp 1 to 2.", n=4)


def test_ranks_given_different_stages_refuse_together():
    r = mpmd(["--prompt-ids", "1,2", "--pp", "2"], ["--prompt-ids", "1,2"])
    one_error_line(r, "rank 1 differs from rank 0 in its --pp: 1 against 2")
    assert r.stdout == ""


FAULT = ["--max-new-tokens", "6", "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--ignore-eos"]


@pytest.mark.parametrize("n, rank", [(2, 0), (2, 1), (4, 3)], ids=["first-stage", "last-stage", "last-stage-tp1"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_an_error_in_a_stage_aborts_every_stage(n, rank, phase):
    t = time.monotonic()
    r = run_cli(FAULT + ["--pp", "2"], n=n, timeout=LIMIT + 5, inject=f"{rank}:{phase}")
    assert time.monotonic() - t < LIMIT and r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if "mpitp: unexpected error" in line]
    assert lines == [f"[rank {rank}] mpitp: unexpected error: RuntimeError: fault injected on this rank during "
                     f"{phase}"] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stage_that_dies_ends_every_stage(rank):
    # Killed (SIGKILL: nothing of mpitp can speak): MPICH's launcher ends the other stages, which wait in a Recv,
    # and says so itself, with its own status: on one node 9 and its block of lines on stdout (as for a
    # tensor-parallel rank killed); across nodes (make test-cluster) its proxy's error lines and 255.
    t = time.monotonic()
    r = run_cli(FAULT + ["--pp", "2"], n=2, timeout=LIMIT + 5, inject=f"{rank}:die")
    assert time.monotonic() - t < LIMIT and r.returncode in (9, 255), r.stderr
    said = "Killed (signal 9)" in r.stdout or "terminated badly" in r.stderr
    assert said and "generated ids" not in r.stdout and "Traceback" not in r.stderr


def test_sigterm_ends_a_pipeline_with_a_stalled_stage(tmp_path):
    # Stage 1 blocked in a read no signal interrupts, stage 0 waiting for its tokens in a Recv: SIGTERM to mpirun
    # ends both within seconds, with mpitp's line (as for a stalled tensor-parallel rank, test_faults_signals.py).
    marker = tmp_path / "stalled-stage"
    marker.mkdir()
    proc = subprocess.Popen([*mpirun(2), sys.executable, str(REPO / "tests" / "inject.py"), "1:stall", "--pp", "2",
                             "--trace", str(marker / "trace"), *FAULT], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=str(REPO), start_new_session=True)
    try:
        time.sleep(3)  # well into the stall (the run itself takes well under a second)
        assert proc.poll() is None, proc.stderr.read()
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=LIMIT)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 5 and proc.returncode == 143 and "] mpitp: terminated" in err and "Traceback" not in err, err
    left = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left running: {left}"


def test_stage_traces_hold_their_layers_and_compare_with_any_layout(tmp_path, five_layers):
    # float64 traces of 1 rank, 1x3 (layers 2,2,1 by hand) and 2x2: each stage's files hold its layers only (and
    # the first the tokens, the last the logits), and compare takes any of them against any other.
    from mpitp.tools import compare
    args = ["--model", five_layers, "--dtype", "float64", "--prompt-ids", "3,1,4,1,5", "--prompt-ids", "9,2",
            "--max-new-tokens", "4", "--ignore-eos", "--quiet"]
    for name, n, extra in (("one", 1, []), ("1x3", 3, ["--pp-layers", "2,2,1"]), ("2x2", 4, ["--pp", "2"])):
        r = run_cli(args + ["--trace", str(tmp_path / name), *extra], n=n)
        assert r.returncode == 0, r.stderr
    held = []
    for r in range(3):
        with np.load(tmp_path / "1x3" / f"rank{r}.npz") as f:
            held.append(({k.split("/")[1] for k in f.files if k.startswith("step1/")}, int(f["stage/first_layer"])))
    assert held == [({"layer0", "layer1", "tokens"}, 0), ({"layer2", "layer3"}, 2), ({"layer4", "logits"}, 4)]
    for a, b in (("one", "1x3"), ("1x3", "2x2"), ("2x2", "one")):
        assert compare.main([str(tmp_path / a), str(tmp_path / b), "--rtol", "1e-9", "--atol", "1e-9"]) == 0


def test_compare_refuses_a_stage_file_without_its_stage(tmp_path):
    r = run_cli(["--prompt-ids", "1,2", "--max-new-tokens", "2", "--pp", "2", "--trace", str(tmp_path / "t"),
                 "--quiet"], n=2)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "t" / "rank1.npz") as f:
        arrays = {k: f[k] for k in f.files if not k.startswith("stage/")}
    np.savez(tmp_path / "t" / "rank1.npz", **arrays)
    c = subprocess.run([sys.executable, "-m", "mpitp.compare", str(tmp_path / "t"), str(tmp_path / "t")],
                       capture_output=True, text=True, env=child_env(), cwd=str(REPO))
    assert c.returncode == 2 and c.stderr.strip().splitlines() == [
        f"mpitp.compare: error: {tmp_path}/t/rank1.npz has no key 'stage/index', which rank0.npz has: a pipeline's "
        f"trace has stage/* in every file."], c.stderr


def test_bench_pipeline_reports_rates_and_the_bubble(tmp_path):
    out = tmp_path / "pp.json"
    r = subprocess.run([*mpirun(2), sys.executable, "-m", "bench", "--preset", "tiny", "--pp", "2", "--batch", "1,3",
                        "--batch-prompt", "8", "--batch-gen", "4", "--json-out", str(out)], capture_output=True,
                       text=True, timeout=120, env=child_env(), cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert "# pipeline: tiny (random), float32, 2 stages of 1 rank(s), layers 1,1" in r.stdout
    rec = json.loads(out.read_text())
    assert (rec["pp"], rec["tp"], rec["layers"], [e["n_batch"] for e in rec["pipeline"]]) == (2, 1, [1, 1], [1, 3])
    for e in rec["pipeline"]:
        assert e["decode_tokens_per_s"] > 0 and e["prefill_tokens_per_s"] > 0 and len(e["stage_wait_share"]) == 2
        assert all(0 <= w <= 1 for w in e["stage_wait_share"])
    # the tables of several records take the tensor-parallel bench's; this one is told apart (before: "not a JSON
    # record of the bench ... written by python -m bench --json-out", which it was)
    for option in ("--summarize", "--cluster-table"):
        s = subprocess.run([sys.executable, "-m", "bench", option, str(out)], capture_output=True, text=True,
                           timeout=60, env=child_env(), cwd=str(REPO))
        one_error_line(s, f"bench: error: {out}: a record of python -m bench --pp (pipeline stages), which its run "
                          f"printed as a table; --summarize and --cluster-table read the tensor-parallel bench's "
                          f"records.")


@pytest.mark.parametrize("extra, expected", [
    (["--pp", "3"], "bench: error: --pp 3: 2 ranks (mpirun -n 2) cannot form 3 pipeline stages"),
    (["--pp", "2", "--osu"], "bench: error: --pp runs the batch test of a preset: leave out --model, --long, --osu "
                             "and --batch-plot."),
    (["--pp-layers", "2,1"], "bench: error: --pp-layers 2,1: give 2 counts of at least 1 layer each (one per "
                             "stage), summing to the model's 2 layers."),
    (["--pp-layers", "3"], "bench: error: --pp-layers 3: give 1 count of at least 1 layer each"),
    # the batch test's checks, as without --pp (before: a TypeError, an IndexError, the kernel's OOM killer)
    (["--pp", "2", "--batch-gen", "1"], "bench: error: --batch-prompt and --batch-repeats must be >= 1 and "
                                        "--batch-gen >= 2 (a decode step follows the prefill's token)."),
    (["--pp", "2", "--batch-repeats", "0"], "bench: error: --batch-prompt and --batch-repeats must be >= 1"),
    (["--pp", "2", "--threads", "0"], "bench: error: --threads must be >= 1, got 0."),
    (["--pp", "2", "--batch-prompt", "1000"], "bench: error: --batch-prompt plus --batch-gen must be at most the "
                                              "model's context of 128 positions, got 1000 + 32."),
    (["--pp", "2", "--batch", "2000000000"], "bench: error: this rank's shard of the model and its KV cache for "
                                             "--batch 2000000000 (2000000000 x 95 positions) needs"),
])
def test_bench_pipeline_refusals(extra, expected):
    r = subprocess.run([*mpirun(2), sys.executable, "-m", "bench", "--preset", "tiny", *extra], capture_output=True,
                       text=True, timeout=60, env=child_env(), cwd=str(REPO))
    one_error_line(r, expected)


@pytest.mark.parametrize("where, rank", [("logits", 1), ("norm", 0)])
def test_activations_that_overflow_in_a_stage_are_refused(tmp_path, where, rank):
    # As test_faults_ranks.py's, with a stage each: the stage where it overflows says so (its rank 0), status 2.
    import dense_reference
    from st_util import write_safetensors
    path = write_random_model(tmp_path / "m", "llama-9h")
    tensors = dense_reference.read_safetensors(f"{path}/model.safetensors")
    if where == "logits":  # the last stage's final norm and LM head
        tensors["model.norm.weight"][:] = 1e30
        tensors["lm_head.weight"] *= 1e10
    else:  # the first stage's embedding
        tensors["model.embed_tokens.weight"] *= 3e37
    write_safetensors(f"{path}/model.safetensors", tensors)
    line = fail_fast(["--model", path, "--pp", "2", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"],
                     "mpitp: error: the model's activations overflow float32 (overflow encountered in ")
    assert line.startswith(f"[rank {rank}] " if rank else "mpitp: ")
