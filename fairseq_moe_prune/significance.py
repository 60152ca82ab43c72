"""Is a difference in translation quality more than noise? Paired bootstrap resampling over test sentences.

The resampling is sacrebleu's own (``sacrebleu.significance``, the code behind ``sacrebleu --paired-bs``):
each system's per-sentence statistics are resampled ``samples`` times with the sentence ids drawn by
numpy's generator from ``SACREBLEU_SEED``, so two systems scored on the same test set with the same seed
are resampled on the very same sentences, exactly as in sacrebleu's paired test. What is added here is the
95% interval of a *difference* (sacrebleu reports one around each system's score) and its extension to the
mean over several test sets (directions): per resample, the mean over the test sets of the paired
differences. The interval's bounds are the order statistics ``sacrebleu.significance.estimate_ci`` uses.
"""

from __future__ import annotations

import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from sacrebleu import significance
from sacrebleu.metrics.base import Metric

SAMPLES = 1000  # sacrebleu's default number of resamples for the paired bootstrap test
SEED = 12345  # sacrebleu's default SACREBLEU_SEED


@dataclass
class Resampled:
    """One system's corpus score on one test set, and on each bootstrap resample of its sentences."""

    score: float
    samples: np.ndarray  # (samples,)


@dataclass(frozen=True)
class Interval:
    """A difference of scores (a - b) and its 95% confidence interval."""

    difference: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    def __str__(self) -> str:
        """``+d [low, high]`` to 2 decimals, more where a bound of an interval that excludes 0 would print as 0.00."""
        digits = 2
        while not self.within_noise and 0 in (round(self.low, digits), round(self.high, digits)) and digits < 6:
            digits += 1
        noise = " within noise" if self.within_noise else ""
        return f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{noise}"


@contextmanager
def sacrebleu_seed(seed: int) -> Iterator[None]:
    """sacrebleu reads its seed from the environment at each call."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = old


def seed_for(name: str) -> int:
    """A seed per test set, so that different test sets of equal length are not resampled at the same
    positions; every system scored on one test set gets the same seed (and so the same resamples)."""
    return SEED + zlib.crc32(name.encode("utf-8")) % 1_000_000


def resample(metric: Metric, hypotheses: Sequence[str], references: Sequence[str], samples: int = SAMPLES,
             seed: int = SEED) -> Resampled:
    """``metric`` (e.g. ``sacrebleu.metrics.CHRF(word_order=2)``) on the test set and on ``samples``
    bootstrap resamples of its sentences, by ``sacrebleu.significance._bootstrap_resample``."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    stats = metric._extract_corpus_statistics(list(hypotheses), [list(references)])
    score = metric._aggregate_and_compute(stats).score
    with sacrebleu_seed(seed):
        _, scores = significance._bootstrap_resample(stats, metric, samples)
    return Resampled(score, np.array([s.score for s in scores]))  # in sacrebleu's dtype


def bounds(samples: np.ndarray) -> tuple[float, float]:
    """The 95% interval of resampled values: the order statistics of sacrebleu's ``estimate_ci``
    (the n//40-th from each end), whose half-width it reports."""
    ordered = np.sort(samples)
    k = len(ordered) // 40
    return float(ordered[k]), float(ordered[len(ordered) - k - 1])


def difference(a: Sequence[Resampled], b: Sequence[Resampled]) -> Interval:
    """The mean over test sets of a's score minus b's, with its paired-bootstrap 95% interval.
    ``a[i]`` and ``b[i]`` are two systems on test set i, resampled with the same seed."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired test sets: {len(a)} vs {len(b)}")
    if any(x.samples.shape != y.samples.shape for x, y in zip(a, b)):
        raise ValueError("paired systems must have the same number of resamples")
    resampled = np.mean([x.samples - y.samples for x, y in zip(a, b)], axis=0)
    low, high = bounds(resampled)
    return Interval(float(np.mean([x.score - y.score for x, y in zip(a, b)])), low, high)


def _resample_job(job: tuple[Metric, Sequence[str], Sequence[str], int, int]) -> Resampled:
    metric, hypotheses, references, samples, seed = job
    return resample(metric, hypotheses, references, samples, seed)


def resample_many(jobs: Sequence[tuple[Metric, Sequence[str], Sequence[str], int, int]],
                  workers: int = 1) -> list[Resampled]:
    """``resample(metric, hypotheses, references, samples, seed)`` for each job, in ``workers`` forked
    processes (sacrebleu's resampling is a Python loop; the jobs are independent)."""
    if workers <= 1 or len(jobs) <= 1:
        return [_resample_job(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_resample_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
