"""Sampling: how the next token is chosen from one position's logits.

Only one rank (rank 0) calls a ``Sampler``; the generation loop broadcasts its choice, so ranks can never
disagree about the next token. Greedy picks the lowest id among equal maxima.
"""

import math

import numpy as np

from .errors import RequestError


class Sampler:
    """Greedy (``temperature == 0``) or temperature sampling with optional top-k and top-p filters.

    Parameters
    ----------
    temperature : float
        0 for greedy; otherwise logits are divided by it before the softmax.
    top_k : int
        Keep only the k most likely tokens (0: no limit).
    top_p : float
        Keep the smallest set of most likely tokens whose probability reaches top_p (1: no limit).
    seed : int
        Seed of the random generator (same seed, same logits: same tokens).
    """

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, seed=0):
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise RequestError(f"top-k must be an integer >= 0 (0 means no limit), got {top_k!r}.")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise RequestError(f"top-p must be in (0, 1] (1 means no limit), got {top_p!r}.")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, float(top_p)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits):
        """The chosen token id for one position's logits ``[n_vocab]``."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.temperature == 0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")  # most likely first, ties by lowest id
        scaled = logits[order] / self.temperature
        if self.top_k:
            scaled = scaled[:self.top_k]
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            probs = probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(probs), p=probs)])
