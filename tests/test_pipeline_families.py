"""Pipeline stages on the newer families against Hugging Face's own classes (the checkpoints of test_families.py,
built by transformers: Gemma 3's local and global layers and norms after each reduction, Qwen3's QK-norm,
Mistral's sliding window), at TP x PP = 1x2, 1x3 (4 layers: not divided), 2x2: the same greedy tokens as Hugging
Face, logits within its float32 norms' precision. Skipped without the hf extra."""

import numpy as np
import pytest

from mpitp import Trace
from mpitp.model import Model
from mpitp.pipeline import generate_stages
from test_families import FAMILIES, PROMPT, hf_greedy, hf_logits, hf_model
from threadcomm import run_ranks


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_equal_hugging_face(name, tmp_path):
    model = hf_model(name, tmp_path)
    expected, greedy = hf_logits(model, PROMPT), hf_greedy(model, PROMPT, 12)
    for size, pp in ((2, 2), (3, 3), (4, 2)):  # 1x2, 1x3 (4 layers: not divided), 2x2
        def run(c):
            m, trace = Model.load(str(tmp_path), c, "float64", pp=pp), Trace()
            tokens = generate_stages(m, [PROMPT], 12, trace=trace)[0].token_ids
            return tokens, m.stage.is_last, m.shard.vocab_cols, trace.arrays.get("step0/logits")

        for tokens, last, cols, logits in run_ranks(size, run):
            assert tokens == greedy, (size, pp)
            if last:  # HF runs Gemma's and Qwen3's norms in float32 even in a float64 model: not closer than that
                assert np.abs(logits - expected[:, cols]).max() <= 1e-4, (size, pp)
