"""The bundled default model really does its task: sorting digits, checked on held-out prompts."""

import random

from mpitp import comm, generate_batch, load_model
from mpitp.generate import DEFAULT_MODEL
from threadcomm import run_ranks

EOS = 256


def held_out(n=400, seed=12345):
    """Prompts drawn from a random stream the training never used (scripts/train_default_model.py)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
        cases.append((f"sort:{digits}=", "".join(sorted(digits))))
    return cases


def answers(c, cases):
    model = load_model(DEFAULT_MODEL, c, "float32")
    prompts = [list(prompt.encode()) for prompt, _ in cases]  # the model's vocabulary: id = byte
    out = generate_batch(model, prompts, 13, stop_ids=[EOS])
    return [bytes(t for t in r.token_ids if t != EOS).decode(errors="replace") for r in out]


def test_default_model_sorts_held_out_digits_at_1_and_2_ranks():
    cases = held_out()
    serial = answers(comm.serial(), cases)
    accuracy = sum(a == want for a, (_, want) in zip(serial, cases)) / len(cases)
    assert accuracy >= 0.95, f"accuracy {accuracy:.3f}"
    assert run_ranks(2, lambda c: answers(c, cases)) == [serial, serial]
    long_ones = [(a, want) for a, (p, want) in zip(serial, cases) if len(want) >= 8]
    assert len(long_ones) > 100 and sum(a == w for a, w in long_ones) / len(long_ones) >= 0.95
