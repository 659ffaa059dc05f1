"""Text in and out: tokenizer.json through the tokenizers library, streaming, batches."""

import json
import shutil
import sys

import numpy as np
import pytest

from conftest import golden, model_dir
from mpitp import ConfigError, Sampler, Trace, comm, generate_sequence, load_model
from mpitp.cli.generate import _Printer
from mpitp.generation import generate_batch
from mpitp.tokenizer import Tokenizer
from threadcomm import run_ranks


def test_golden_text_prompt_round_trip():
    g = golden("gpt2-tiny")
    tok = Tokenizer(model_dir("gpt2-tiny"))
    assert tok.encode(str(g["text_prompt"])) == g["text_prompt_ids"].tolist()
    assert tok.decode(g["text_greedy_f64"]) == str(g["text_continuation_f64"])


@pytest.mark.parametrize("text", ["日本語のテキスト", "naïve café ☕ ok", "emoji 🎉 and ascii"])
def test_streaming_never_prints_half_a_character(text):
    tok = Tokenizer(model_dir("gpt2-tiny"))  # byte-level: a multi-byte character spans several tokens
    ids = tok.encode(text)
    assert len(ids) > len(text)
    step = tok.stream()
    pieces = [step(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_printer_stream_equals_final_text(capsys):
    class Args:
        json = no_stream = False

    tok = Tokenizer(model_dir("gpt2-tiny"))
    ids = tok.encode("über 日本") + [214]  # ends with a byte that never completes a character
    printer = _Printer(Args, 0, tok, ["prompt: "])
    for i in ids:
        printer.on_token(0, i)
    printer.finish(tok.decode(ids))
    assert capsys.readouterr().out == "prompt: " + tok.decode(ids) + "\n"


def test_missing_tokenizer_or_library_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"pip install 'mpitp\[text\]'"):
        Tokenizer(model_dir("gpt2-tiny"))


def test_bos_is_added_when_the_tokenizer_config_says_so(tmp_path):
    shutil.copytree(model_dir("llama-gqa"), tmp_path / "m")
    plain = Tokenizer(str(tmp_path / "m"), bos_token_id=256).encode("hi")
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert Tokenizer(str(tmp_path / "m"), bos_token_id=256).encode("hi") == [256] + plain


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_batch_equals_one_by_one(name):
    # Prompts of lengths 1, 7 and 33 in one batch: each exactly as alone (and as HF, greedy), whether the batch's
    # choices are one Gather (greedy, plain temperature) or one row at a time (top-k, top-p).
    g = golden(name)
    prompts = [g[f"prompt_L{L}"].tolist() for L in (33, 1, 7)]
    for sampler in (Sampler(0), Sampler(0.8, seed=3), Sampler(0.9, top_k=20, seed=4), Sampler(1.1, top_p=0.8, seed=5)):
        def run(c):
            model = load_model(model_dir(name), c, "float64")
            fresh = lambda: Sampler(sampler.temperature, sampler.top_k, sampler.top_p, sampler.seed)  # noqa: E731
            batch = [r.token_ids for r in generate_batch(model, prompts, 12, fresh())]
            alone = [generate_sequence(model, p, 12, fresh()).token_ids for p in prompts]
            return batch, alone

        for size in (1, 2, 3):
            for batch, alone in run_ranks(size, run):
                assert batch == alone
                if sampler.temperature == 0:
                    assert batch == [g[f"greedy_x64_L{L}"][:12].tolist() for L in (33, 1, 7)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_prompts_of_one_length_prefilled_together_are_exactly_as_alone(dtype):
    # Runs of equal length (7, 7, 7 and 33, 33 around a 1) go through as one forward each: every sequence gets
    # the tokens of its prompt alone, at 1, 2 and 3 ranks, and its logits up to the rounding of products with
    # more rows (OpenBLAS's kernels depend on the row count: 90% of them differ in the last bits, as a batch's
    # decode steps already do).
    g = golden("llama-gqa")
    prompts = [g[f"prompt_L{L}"].tolist() for L in (7, 7, 7, 1, 33, 33)]
    prompts[1], prompts[4] = prompts[1][::-1], prompts[4][::-1]  # same lengths, other tokens

    def run(c):
        model = load_model(model_dir("llama-gqa"), c, dtype)
        forwards = []
        model.forward = lambda ids, *a, f=model.forward, **k: forwards.append(np.shape(ids)) or f(ids, *a, **k)
        batch = [r.token_ids for r in generate_batch(model, prompts, 6)]
        prefill, forwards[:] = forwards[:3], []
        alone = [generate_sequence(model, p, 6).token_ids for p in prompts]
        stacked = model.forward(np.array(prompts[4:]), model.new_cache(33, 2), gather=False)[:, -1]
        one = [model.forward(p, model.new_cache(33), gather=False)[-1] for p in prompts[4:]]
        return prefill, batch, alone, np.abs(stacked - np.stack(one)).max()

    for size in (1, 2, 3):
        for prefill, batch, alone, gap in run_ranks(size, run):
            assert prefill == [(3, 7), (1, 1), (2, 33)] and batch == alone
            assert gap <= {"float32": 1e-5, "float64": 1e-12}[dtype]


def test_batch_stops_each_sequence_on_its_own():
    g = golden("gpt2-tiny")
    model = load_model(model_dir("gpt2-tiny"), comm.serial(), "float64")
    first = g["greedy_x64_L7"].tolist()
    eos = first[3]  # the 7-token prompt's 4th token ends that sequence; the others go on
    trace = Trace()
    out = generate_batch(model, [g["prompt_L7"], g["prompt_L33"]], 10, stop_ids=[eos], trace=trace)
    assert out[0].token_ids == first[:first.index(eos) + 1] and out[0].finish_reason == "eos"
    other = g["greedy_x64_L33"].tolist()[:10]
    assert eos not in other and out[1].token_ids == other
    assert np.array_equal(out[0].prompt_ids, g["prompt_L7"])
    # A finished sequence leaves the batch: decode steps after its last token run the other one alone.
    rows = [trace.arrays[f"step{s}/logits"].shape[0] for s in range(1, 10)]
    assert rows == [2] * first.index(eos) + [1] * (9 - first.index(eos))


def test_a_cache_refused_on_one_rank_only_is_refused_on_every_rank(monkeypatch):
    # Library use: the memory check reads each machine's own free memory, so it can fail on one rank alone.
    # The ranks agree before the first collective, instead of the others waiting in it for ever.
    import threading
    from mpitp import RequestError
    from mpitp import model as model_module
    from mpitp.resources import check_fits
    local = threading.local()

    def fits_except_on_rank_1(nbytes, what, hint, node_ranks=1):
        if what.startswith("a KV cache") and local.rank == 1:
            raise RequestError("a KV cache of 1 x 8 positions needs more memory than rank 1 has.")
        return check_fits(nbytes, what, hint, node_ranks)

    def run(c):
        local.rank = c.Get_rank()
        model = load_model(model_dir("gpt2-tiny"), c, "float32")
        with pytest.raises(RequestError) as refused:
            generate_sequence(model, [1, 2, 3], 5)
        return str(refused.value)

    monkeypatch.setattr(model_module, "check_fits", fits_except_on_rank_1)
    assert run_ranks(2, run) == ["another rank could not allocate its KV cache; see its error.",
                                 "a KV cache of 1 x 8 positions needs more memory than rank 1 has."]
