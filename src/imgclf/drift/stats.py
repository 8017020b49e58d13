"""Two tests in numpy and the standard library: chi-square and two-sample Kolmogorov-Smirnov.

scipy would add 40 MB and a second of import time to the server for two functions; these match
it (tests/code/test_drift.py compares them).
"""

import math

import numpy as np

_EPS = 1e-15
_TINY = 1e-300
_ITERATIONS = 1000


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square with `dof` degrees of freedom: Q(dof/2, x/2), the regularized
    upper incomplete gamma function (Numerical Recipes' series and continued fraction)."""
    if dof < 1:
        raise ValueError(f"chi-square needs at least one degree of freedom, got {dof}")
    if x <= 0:
        return 1.0
    a, z = dof / 2.0, x / 2.0
    log_front = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1:  # the series for P converges fast here; Q is not small, so 1 - P is exact enough
        term = total = 1.0 / a
        n = a
        for _ in range(_ITERATIONS):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's continued fraction for Q itself: accurate however small Q is.
    b = z + 1 - a
    c, d = 1 / _TINY, 1 / b
    h = d
    for i in range(1, _ITERATIONS):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = d if abs(d) > _TINY else _TINY
        c = b + an / c
        c = c if abs(c) > _TINY else _TINY
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < _EPS:
            break
    return math.exp(log_front) * h


def chi2_homogeneity(reference: np.ndarray, observed: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value) of the chi-square test that two count vectors come from one
    distribution (a 2 x K contingency table; bins empty in both are dropped).

    A test of homogeneity rather than of goodness of fit: the reference counts are a sample too,
    and treating their frequencies as exact would make a small reference raise false alarms.
    """
    table = np.stack([np.asarray(reference, dtype=float), np.asarray(observed, dtype=float)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return statistic, chi2_sf(statistic, table.shape[1] - 1)


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for Kolmogorov's limiting distribution K (of sqrt(n) x the KS statistic)."""
    if x <= 0:
        return 1.0
    if x < 1.18:  # the theta-function form converges fast for small x, the alternating one for large
        k = math.sqrt(2 * math.pi) / x
        w = -(math.pi**2) / (8 * x * x)
        total = sum(math.exp(w * (2 * j - 1) ** 2) for j in range(1, 6))
        return min(1.0, max(0.0, 1.0 - k * total))
    w = -2 * x * x
    total = sum((-1) ** (j - 1) * math.exp(w * j * j) for j in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def ks_2samp(reference_sorted: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    """(D, p-value) of the two-sided two-sample Kolmogorov-Smirnov test.

    D is exact; the p-value is Kolmogorov's limit with Stephens' small-sample correction
    (Numerical Recipes' `kstwo`), within about 0.01 of the exact p-value at windows of 100 and
    more. `reference_sorted` must be sorted ascending. Ties make the test conservative.
    """
    a = np.asarray(reference_sorted, dtype=float)
    b = np.sort(np.asarray(sample, dtype=float))
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return 0.0, 1.0
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / n
    cdf_b = np.searchsorted(b, points, side="right") / m
    d = float(np.abs(cdf_a - cdf_b).max())
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)
