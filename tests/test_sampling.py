"""Token choice from vocab-split logits: identical to the whole-logits choice at any split, and correct."""

import numpy as np
import pytest

from mpitp import RequestError, Sampler, comm, generate_sequence, load_model
from mpitp.sampling import gumbel_noise
from mpitp.sharding import block_range
from random_models import write_random_model
from threadcomm import run_ranks

SAMPLERS = [Sampler(0), Sampler(0.8, seed=1), Sampler(1.3, top_k=5, seed=2), Sampler(0.7, top_p=0.9, seed=3),
            Sampler(1.0, top_k=40, top_p=0.5, seed=4), Sampler(2.0, top_p=0.999, seed=5)]


def split_choose(sampler, logits, size, step):
    """The token ``sampler`` picks when ``logits`` are split over ``size`` simulated ranks (from rank 0)."""
    def body(c):
        start, n = block_range(len(logits), size, c.Get_rank())
        return sampler.choose(c, logits[start:start + n], start, step)
    return run_ranks(size, body)[0]


def whole_choose(sampler, logits, step):
    return sampler.choose(comm.serial(), logits, 0, step)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_split_choice_equals_whole_choice(sampler):
    rng = np.random.default_rng(0)
    for step in range(12):
        n_vocab = int(rng.integers(50, 400))  # mostly not divisible by the rank counts
        logits = rng.standard_normal(n_vocab) * rng.choice([0.1, 1.0, 5.0])
        whole = whole_choose(sampler, logits, step)
        for size in (2, 3, 4, 7):
            assert split_choose(sampler, logits, size, step) == whole


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_a_batch_of_rows_gets_each_row_alone_s_token(sampler):
    # choose_rows (a batch's step: one Gather for every row, or row by row with top-k/top-p) against choose of
    # each row alone on the whole vocabulary, at 1 to 4 ranks; a list on the root, None for each row elsewhere.
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 211)) * np.array([0.1, 1.0, 5.0, 1.0, 2.0])[:, None]
    logits[3, [7, 150]] = logits[3].max() + 1  # a tie across ranks: the lowest id
    for step in (0, 5):
        alone = [whole_choose(sampler, row, step) for row in logits]
        if sampler.temperature == 0:  # and independently of mpitp: NumPy's argmax, the first of equal maxima
            assert alone == np.argmax(logits, axis=1).tolist() and alone[3] == 7
        for size in (1, 2, 3, 4):
            def body(c):
                start, n = block_range(logits.shape[1], size, c.Get_rank())
                return sampler.choose_rows(c, logits[:, start:start + n], start, step)
            chosen = run_ranks(size, body)
            assert chosen[0] == alone and all(c == [None] * 5 for c in chosen[1:])


def test_ties_go_to_the_lowest_id_in_every_split():
    logits = np.zeros(101)
    logits[[17, 45, 80]] = 3.0  # equal maxima on different ranks
    for size in (1, 2, 3, 4):
        assert split_choose(Sampler(0), logits, size, 0) == 17
    # A top-k boundary inside a run of equal values keeps the lowest ids: k=2 of {17, 45, 80} -> {17, 45}.
    picks = {split_choose(Sampler(1.0, top_k=2, seed=s), logits, 3, s) for s in range(60)}
    assert picks == {17, 45}
    flat = np.zeros(30)  # all equal: top-k 4 keeps ids 0..3 in any split
    for size in (1, 2, 4):
        assert {split_choose(Sampler(1.0, top_k=4, seed=s), flat, size, s) for s in range(80)} == {0, 1, 2, 3}


def test_top_p_rounds_on_a_flat_distribution():
    # Nearly flat over 5000 ids: top-p 0.9 needs ~4500 candidates, so several gathering rounds.
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(5000) * 0.01
    for step in range(3):
        whole = whole_choose(Sampler(1.0, top_p=0.9, seed=9), logits, step)
        assert split_choose(Sampler(1.0, top_p=0.9, seed=9), logits, 3, step) == whole


def test_sampling_follows_the_filtered_distribution():
    # Frequencies over many steps against the exact top-k / top-p renormalized softmax.
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    n = 6000
    for sampler, support in ((Sampler(1.0, seed=11), 6), (Sampler(1.0, top_k=3, seed=12), 3),
                             (Sampler(1.0, top_p=0.75, seed=13), 3), (Sampler(1.0, top_p=0.85, seed=14), 4)):
        counts = np.bincount([whole_choose(sampler, logits, s) for s in range(n)], minlength=6)
        p = np.exp(logits[:support]) / np.exp(logits[:support]).sum()
        assert counts[support:].sum() == 0
        assert np.all(np.abs(counts[:support] / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3)
    # temperature flattens: T=2 follows softmax(logits / 2)
    counts = np.bincount([whole_choose(Sampler(2.0, seed=15), logits, s) for s in range(n)], minlength=6)
    p = np.exp(logits / 2) / np.exp(logits / 2).sum()
    assert np.all(np.abs(counts / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3)


def test_noise_is_a_pure_function_of_seed_step_and_id():
    a = gumbel_noise(5, 3, np.arange(1000))
    assert np.array_equal(a[400:600], gumbel_noise(5, 3, np.arange(400, 600)))
    assert not np.array_equal(a, gumbel_noise(5, 4, np.arange(1000)))
    assert not np.array_equal(a, gumbel_noise(6, 3, np.arange(1000)))
    assert abs(a.mean() - 0.5772) < 0.1  # Gumbel(0, 1) mean: the Euler-Mascheroni constant


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=1e-320),
                                 dict(temperature=1e-7), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(seed=-1)])
def test_bad_sampling_values_are_refused(bad):
    with pytest.raises(RequestError):
        Sampler(**bad)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_non_finite_logits_on_any_rank_are_refused_by_the_root(sampler, bad):
    # One rank's slice holds the bad value; -inf fills it (a row with nothing finite, as if fully masked).
    for size in (1, 3):
        logits = np.random.default_rng(0).standard_normal(90)
        if bad == -np.inf:
            logits[60 if size == 3 else 0:] = bad  # the whole slice of rank 2, or of the only rank
        else:
            logits[75] = bad
        with pytest.raises(RequestError, match="NaN or infinite"):
            split_choose(sampler, logits, size, 0)


def test_top_k_above_the_vocabulary_means_every_token(tmp_path):
    # A huge k is the same request as no limit, and costs no k-sized buffers.
    model = load_model(write_random_model(tmp_path / "m", "gpt2-6h"), comm.serial())
    runs = [generate_sequence(model, [1, 2, 3], 8, Sampler(1.0, top_k=k, seed=7)).token_ids for k in (0, 10**12)]
    assert runs[0] == runs[1]




@pytest.mark.parametrize("name", ["gpt2-6h", "llama-9h"])
def test_same_seed_same_tokens_at_every_rank_count(tmp_path, name):
    # The vocabulary (97) and the heads split unevenly over most of these rank counts; the tokens must not
    # depend on the split, greedy or sampled.
    path = write_random_model(tmp_path / name, name)
    prompt = [5, 80, 3, 41, 7]
    for sampler in SAMPLERS:
        def run(c):
            fresh = Sampler(sampler.temperature, sampler.top_k, sampler.top_p, sampler.seed)
            return generate_sequence(load_model(path, c, "float64"), prompt, 12, fresh).token_ids

        serial = run(comm.serial())
        for size in range(2, 7):
            assert run_ranks(size, run) == [serial] * size
