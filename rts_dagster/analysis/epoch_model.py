"""What Metta's per-label epoch series can and cannot tell about per-completion rewards.

Logging path (DOMAIN.md): every environment keeps the *last* reward it saw per label and
attaches that dict to the info of every episode end; the trainer averages each key over
all infos of the epoch. `held_value_epoch_means` forms those epoch values from a
completion stream (what the simulator logs).

Model (one label L at a plateau). Completions j = 1, 2, ... in time order, C per epoch
(all labels); each lands in an environment drawn uniformly from N and is a completion of L
with probability p = c / C (c = completions of L per epoch), independently; an L reward is
mu + sigma * eps (eps iid, variance 1). h(j) = the value of L held by the environment of
completion j right after it; the epoch value Y_e is the mean of h(j) over the epoch's
completions (at a plateau every environment has seen L, so C terms).

Covariance of two held values j < k: they are the same draw iff both are in the same
environment (1/N), completion k is not L (1 - p) and that environment did not complete L
in between (rho^(k-j-1), rho = 1 - p/N); otherwise independent:

    Cov(h_j, h_k) = sigma^2 (1 - p) / N * rho^(k-j-1),    Var(h_j) = sigma^2.

Summing over the C x C pairs of one epoch, or of epochs e and e + k (geometric sums):

    gamma(0) = sigma^2 / C + 2 sigma^2 (1-p) / (N C^2) * [C (1-rho) - (1 - rho^C)] / (1-rho)^2
    gamma(k) = sigma^2 (1-p) / (N C^2) * rho^((k-1) C) * ((1 - rho^C) / (1 - rho))^2, k >= 1

(exact for this model: `epoch_autocovariance(..., exact=True)`). With lambda = c / N
(completions of L per environment per epoch), rho^C -> e^-lambda and C (1 - rho) ->
lambda for large C, which gives the continuous form

    gamma(0) = W + A g(lambda),   gamma(k) = A e^(-lambda (k-1)) h(lambda)^2,
    W = sigma^2 / C,  A = sigma^2 (1 - p) / N,
    g(l) = 2 (l - 1 + e^-l) / l^2 = E[e^(-l |U - U'|)],  h(l) = (1 - e^-l) / l.

So the epoch series is white noise W (which environments happened to end an episode in
the epoch) plus a slow AR(1) part of variance ~A that decays by e^-lambda per epoch (the
mean of the N held values, each renewed at rate lambda). The often-quoted
"Var = sigma^2 / N * g(lambda)" is the A term alone: it misses W and the factor (1 - p).
Since N A = sigma^2 (1 - p) and c W = sigma^2 p:

    sigma^2 = N A + c W,   i.e.  c (A / lambda + W)  given c,  N (A + lambda W)  given N,
    and sigma^2 = C W given C alone.

Drift: with a level moving linearly by beta per epoch, a held value is the reward of a
completion that is on average (1 - p) N / p completions = (1 - p) / lambda epochs old, so
E[Y_e] = mu(e + 1/2) - beta (1 - p) / lambda: the same slope beta per epoch, lagging a
per-completion epoch mean by (1 - p) / lambda epochs. Per completion of L the drift is
beta / c. (A random-walk level is passed through the same lag filter; it is not modelled
here.)

What one series can tell, in epoch units: the slope beta, the white part W, the slow part
A and its decay lambda, and the trend-robust noise Var(Y_e - Y_e-1) / 2 = W + A (g - h^2).
In per-completion units nothing without a scale: W, A, lambda are unchanged when sigma^2,
N and C are all multiplied by the same factor. Hence `to_per_completion` needs c, N or C.

Regimes. Metta runs thousands of environments (num_envs x agents x bptt = agent steps per
epoch), each ending an episode every ~16 epochs: N >> C, lambda ~ 0.001-0.05. Then A / W =
C (1 - p) / N is small and 1 / lambda exceeds most runs: the series looks like white noise
of variance sigma^2 / C around a level that lags by ~1 / lambda epochs, and lambda cannot be
told (flagged); sigma then needs C. With few environments (N < C) all three are resolved.

Estimator (`estimate_epoch_series`, many series at once): OLS line per series (beta);
Whittle's approximate likelihood of the residual periodogram under f(w) = W + A b(w;
lambda) (b: spectrum of the slow part), on a grid of lambda x A / (W + A) with the scale
profiled out. lambda (and A, W) is reported only when the fit beats white noise by a
log-likelihood gain >= 3, lambda * n >= 5 (otherwise the OLS detrending absorbs the slow
part) and lambda <= 3 (else the slow part dies within one epoch). Accuracy, 150-epoch
series: lambda and sigma (given c) within ~10 % in the median on the Monte Carlo process,
per-completion sigma within ~15 % (median) / ~40 % (worst label) on simulated plateaus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MIN_EPOCHS = 30  # shorter series: nothing is estimated
MIN_LAMBDA_SPAN = 5.0  # lambda * n below this: the slow part is not resolved
MAX_LAMBDA = 3.0  # above: e^-lambda < 0.05, the slow part dies within one lag


# ---------------------------------------------------------------------------------------
# The logging path
# ---------------------------------------------------------------------------------------


def held_value_epoch_means(
    epoch: np.ndarray,
    env_id: np.ndarray,
    label_index: np.ndarray,
    reward: np.ndarray,
    n_epochs: int,
    n_labels: int,
) -> np.ndarray:
    """(n_epochs, n_labels) epoch values as Metta logs them, from completions in time order.

    Per environment, the last reward of each label is forward-filled over its episode ends
    (the completion just finished included); each epoch averages, per label, the held
    values of all its episode ends whose environment has seen that label. NaN where no
    such episode end exists (label not yet seen, or an empty epoch)."""
    epoch = np.asarray(epoch, dtype=np.int64)
    env_id = np.asarray(env_id, dtype=np.int64)
    label_index = np.asarray(label_index, dtype=np.int64)
    reward = np.asarray(reward, dtype=np.float64)
    n = reward.size
    out = np.full((n_epochs, n_labels), np.nan)
    if n == 0:
        return out
    order = np.lexsort((np.arange(n), env_id))  # by environment, then completion order
    env_sorted = env_id[order]
    position = np.arange(n)
    is_start = np.concatenate([[True], env_sorted[1:] != env_sorted[:-1]])
    group_start = np.maximum.accumulate(np.where(is_start, position, 0))
    # Last position (in sorted order) at or before each row where the label was played.
    last = np.full((n, n_labels), -1, dtype=np.int64)
    last[position, label_index[order]] = position
    last = np.maximum.accumulate(last, axis=0)
    seen = last >= group_start[:, None]  # inside this environment's own history
    held = np.where(seen, reward[order][np.maximum(last, 0)], 0.0)
    cells = (epoch[order][:, None] * n_labels + np.arange(n_labels)[None, :]).ravel()
    size = n_epochs * n_labels
    sums = np.bincount(cells, weights=held.ravel(), minlength=size)
    counts = np.bincount(cells, weights=seen.ravel().astype(np.float64), minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, np.nan)
    return means.reshape(n_epochs, n_labels)


# ---------------------------------------------------------------------------------------
# Forward model: moments of the epoch series
# ---------------------------------------------------------------------------------------


def window_factor(lam: np.ndarray | float) -> np.ndarray:
    """g(l) = 2 (l - 1 + e^-l) / l^2: mean of e^(-l |U - U'|) over two uniform times in
    one epoch (g(0) = 1); the share of the slow variance A seen within one epoch."""
    lam = np.asarray(lam, dtype=np.float64)
    small = np.abs(lam) < 1e-4
    safe = np.where(small, 1.0, lam)
    exact = 2.0 * (safe + np.expm1(-safe)) / safe**2
    return np.where(small, 1.0 - lam / 3.0 + lam**2 / 12.0, exact)


def carry_factor(lam: np.ndarray | float) -> np.ndarray:
    """h(l) = (1 - e^-l) / l (h(0) = 1): mean of e^(-l U), the lag-1 carry-over."""
    lam = np.asarray(lam, dtype=np.float64)
    small = np.abs(lam) < 1e-6
    safe = np.where(small, 1.0, lam)
    return np.where(small, 1.0 - lam / 2.0, -np.expm1(-safe) / safe)


@dataclass(frozen=True)
class EpochMoments:
    """Moments of a plateaued label's epoch series under held-value averaging."""

    autocovariance: np.ndarray  # (max_lag + 1,) gamma(0), gamma(1), ...
    white: float  # W = sigma^2 / C
    slow: float  # A = sigma^2 (1 - p) / N
    lam: float  # lambda = c / N, completions of the label per environment per epoch
    lag_epochs: float  # (1 - p) / lambda: how far the epoch value trails the level
    mean_difference: float  # E[Y_e - Y_e-1] = beta, the drift per epoch
    diff_noise_var: float  # Var(Y_e - Y_e-1) / 2 = W + A (g - h^2)

    @property
    def variance(self) -> float:
        return float(self.autocovariance[0])


def epoch_autocovariance(
    sigma: float,
    n_envs: float,
    label_per_epoch: float,
    total_per_epoch: float,
    max_lag: int = 10,
    exact: bool = True,
) -> np.ndarray:
    """gamma(0..max_lag) of the epoch series (module docstring): the exact sums of the
    iid-environment model, or with `exact=False` the continuous form in lambda."""
    n_envs, c, total = float(n_envs), float(label_per_epoch), float(total_per_epoch)
    if not (n_envs > 0 and 0 < c <= total):
        raise ValueError("need n_envs > 0 and 0 < label_per_epoch <= total_per_epoch")
    var, p, lags = sigma**2, c / total, np.arange(1, max_lag + 1)
    if exact:
        rho = 1.0 - p / n_envs
        q = 1.0 - rho
        rho_c = rho**total
        pair_sum = (total * q - (1.0 - rho_c)) / q**2
        gamma0 = var / total + 2.0 * var * (1.0 - p) / (n_envs * total**2) * pair_sum
        gamma = (
            var * (1.0 - p) / (n_envs * total**2) * rho_c ** (lags - 1) * ((1.0 - rho_c) / q) ** 2
        )
    else:
        lam = c / n_envs
        white, slow = var / total, var * (1.0 - p) / n_envs
        gamma0 = white + slow * float(window_factor(lam))
        gamma = slow * np.exp(-lam * (lags - 1)) * float(carry_factor(lam)) ** 2
    return np.concatenate([[gamma0], gamma])


def epoch_moments(
    sigma: float,
    n_envs: float,
    label_per_epoch: float,
    total_per_epoch: float,
    drift_per_epoch: float = 0.0,
    max_lag: int = 10,
) -> EpochMoments:
    """Moments of the epoch series of a label with per-completion noise `sigma`, N
    environments, c completions of the label and C of all labels per epoch, and a level
    moving by `drift_per_epoch` (beta) per epoch."""
    gamma = epoch_autocovariance(sigma, n_envs, label_per_epoch, total_per_epoch, max_lag)
    p = label_per_epoch / total_per_epoch
    lam = label_per_epoch / n_envs
    return EpochMoments(
        autocovariance=gamma,
        white=sigma**2 / total_per_epoch,
        slow=sigma**2 * (1.0 - p) / n_envs,
        lam=lam,
        lag_epochs=(1.0 - p) / lam,
        mean_difference=drift_per_epoch,
        diff_noise_var=float(gamma[0] - gamma[1]) if max_lag >= 1 else math.nan,
    )


# ---------------------------------------------------------------------------------------
# Estimator: what one epoch series tells, in epoch units
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochSeriesEstimate:
    """Per series (arrays of shape (S,)), in epoch units; NaN where it cannot be told,
    with the reason in `note` ("" when everything was estimated)."""

    n: np.ndarray  # finite epochs used
    drift_per_epoch: np.ndarray  # beta: OLS slope, reward per epoch
    variance: np.ndarray  # gamma(0) of the detrended series
    autocovariance: np.ndarray  # (S, max_lag + 1) sample gamma(k) of the detrended series
    diff_noise_var: np.ndarray  # Var(first differences) / 2 = W + A (g - h^2)
    lam: np.ndarray  # decay rate of the slow part per epoch (= c / N)
    slow: np.ndarray  # A: variance of the slow part
    white: np.ndarray  # W: epoch-to-epoch white variance
    note: tuple[str, ...]


def _as_2d(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        return values[None, :]
    if values.ndim != 2:
        raise ValueError("values must be (n_epochs,) or (n_series, n_epochs)")
    return values


def _lagged_products(x: np.ndarray, mask: np.ndarray, max_lag: int) -> np.ndarray:
    """(S, max_lag + 1) mean of x_t x_{t+k} over the pairs where both are finite."""
    out = np.full((x.shape[0], max_lag + 1), np.nan)
    for k in range(max_lag + 1):  # a handful of lags, each vectorised over all series
        both = mask[:, : x.shape[1] - k] & mask[:, k:]
        prod = np.where(both, x[:, : x.shape[1] - k] * x[:, k:], 0.0)
        pairs = both.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, k] = np.where(pairs > 0, prod.sum(axis=1) / pairs, np.nan)
    return out


def _whittle_fit(
    resid: np.ndarray, n: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Whittle fit of the held-value model to detrended series: (lambda, W, A, gain).

    Spectral density f(w) = W + A b(w; lambda), with b the spectrum of the slow part
    (autocovariance g(lambda) at lag 0, h^2 e^(-lambda (k-1)) at lag k >= 1):
    b = (g - h^2 / phi) + (h^2 / phi) (1 - phi^2) / (1 - 2 phi cos w + phi^2), phi = e^-lambda.
    Grid over lambda (log-spaced) x share s = A / (W + A), the scale profiled out; `gain`
    is the log-likelihood gain over white noise (s = 0). All series at once: the
    periodograms times every grid point's 1 / shape is one matrix product."""
    n_epochs = resid.shape[1]
    keep, inv_shape, log_m = _whittle_grid(n_epochs)
    n_freq = int(keep.sum())
    periodogram = np.abs(np.fft.rfft(resid, axis=1)) ** 2 / np.maximum(n, 1)[:, None]
    periodogram = periodogram[:, keep]
    # (S, share, lambda)
    ratio = (periodogram @ inv_shape.T).reshape(-1, *log_m.shape) / n_freq
    with np.errstate(divide="ignore", invalid="ignore"):
        objective = 0.5 * (log_m[None] + n_freq * np.log(ratio))  # -log likelihood + const
        flat = objective.reshape(objective.shape[0], -1)
        best = np.argmin(np.where(np.isnan(flat), np.inf, flat), axis=1)
        share_i, lam_i = np.unravel_index(best, objective.shape[1:])
        tau = ratio[np.arange(ratio.shape[0]), share_i, lam_i]
        share = SHARE_GRID[share_i]
        gain = objective[:, 0, 0] - flat[np.arange(flat.shape[0]), best]
    return LAMBDA_GRID[lam_i], tau * (1.0 - share), tau * share, gain


@lru_cache(maxsize=16)
def _whittle_grid(n_epochs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For series of `n_epochs`: the frequencies kept, 1 / shape per grid point as a
    (share x lambda, frequency) matrix, and sum of log shape per (share, lambda). The same
    for every series of that length: built once (read-only)."""
    freq = 2.0 * np.pi * np.arange(n_epochs // 2 + 1) / n_epochs
    keep = (freq > 0) & (freq < np.pi)  # drop the mean (0 after detrending) and Nyquist
    cos_w = np.cos(freq[keep])
    lam = LAMBDA_GRID[:, None]
    phi = np.exp(-lam)
    carry = carry_factor(lam) ** 2 / phi
    ar_kernel = (1.0 - phi**2) / (1.0 - 2.0 * phi * cos_w + phi**2)
    slow_kernel = np.maximum(window_factor(lam) - carry + carry * ar_kernel, 1e-12)
    shape = (1.0 - SHARE_GRID)[:, None, None] + SHARE_GRID[:, None, None] * slow_kernel[None]
    inv_shape = (1.0 / shape).reshape(-1, cos_w.size)
    log_m = np.log(shape).sum(axis=2)
    for array in (keep, inv_shape, log_m):
        array.setflags(write=False)
    return keep, inv_shape, log_m


LAMBDA_GRID = np.geomspace(0.003, 5.0, 160)
SHARE_GRID = np.linspace(0.0, 1.0, 101)
MIN_LOGLIK_GAIN = 3.0  # Whittle log-likelihood gain over white noise below this: not told


def estimate_epoch_series(values: np.ndarray, max_lag: int | None = None) -> EpochSeriesEstimate:
    """Estimate drift, white noise, slow part and its decay from epoch series.

    `values`: (n_epochs,) or (n_series, n_epochs), NaN for epochs not logged (filled with
    the line after detrending). Each series is detrended by its OLS line (beta = drift
    per epoch); white + AR(1) is fitted by Whittle's approximate likelihood; the AR(1)
    part (variance d, coefficient phi) gives lambda = -ln phi, A = d phi / h(lambda)^2,
    W = u + d - A g(lambda). lambda (and A, W) is flagged as not told when the series is
    short, constant, the fit is not clearly better than white noise, lambda * n < 5 or
    lambda > 3. `max_lag` bounds the reported autocovariances only."""
    y = _as_2d(values)
    n_series, n_epochs = y.shape
    mask = np.isfinite(y)
    n = mask.sum(axis=1)
    t = np.broadcast_to(np.arange(n_epochs, dtype=np.float64), y.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_mean = np.where(mask, t, 0.0).sum(axis=1) / n
        y_mean = np.where(mask, y, 0.0).sum(axis=1) / n
        dt = np.where(mask, t - t_mean[:, None], 0.0)
        dy = np.where(mask, y - y_mean[:, None], 0.0)
        slope = (dt * dy).sum(axis=1) / (dt * dt).sum(axis=1)
        resid = np.where(mask, dy - slope[:, None] * dt, 0.0)
        diffs = np.diff(y, axis=1)
        dmask = np.isfinite(diffs)
        dn = dmask.sum(axis=1)
        dmean = np.where(dmask, diffs, 0.0).sum(axis=1) / dn
        dvar = np.where(dmask, (diffs - dmean[:, None]) ** 2, 0.0).sum(axis=1) / (dn - 1)
    lag_max = 1 if max_lag is None else max(1, int(max_lag))
    gamma = _lagged_products(resid, mask, min(lag_max, max(n_epochs - 1, 0)))
    resid = np.where(np.isfinite(resid), resid, 0.0)
    lam, white, slow, gain = _whittle_fit(resid, n)
    notes: list[str] = []
    told = np.zeros(n_series, dtype=bool)
    for s in range(n_series):  # the verdict per series (a handful of branches)
        if n[s] < MIN_EPOCHS:
            notes.append(f"too short: {int(n[s])} epochs < {MIN_EPOCHS}")
        elif not gamma[s, 0] > (1e-12 * max(abs(y_mean[s]), 1.0)) ** 2:
            notes.append("constant series: no noise or decay to tell")
        elif not (gain[s] >= MIN_LOGLIK_GAIN and slow[s] > 0):
            notes.append("no slow part distinguishable from white noise: lambda not told")
        elif lam[s] * n[s] < MIN_LAMBDA_SPAN:
            notes.append(
                f"slow part not resolved: lambda * n = {lam[s] * n[s]:.1f} < "
                f"{MIN_LAMBDA_SPAN:g} (1/lambda ~ {1 / lam[s]:.0f} epochs)"
            )
        elif lam[s] > MAX_LAMBDA:
            notes.append(f"slow part dies within one epoch (lambda = {lam[s]:.1f}): not told")
        else:
            notes.append("")
            told[s] = True
    short = n < MIN_EPOCHS
    nan = np.full(n_series, np.nan)
    return EpochSeriesEstimate(
        n=n.astype(np.int64),
        drift_per_epoch=np.where(short, nan, slope),
        variance=np.where(short, nan, gamma[:, 0]),
        autocovariance=np.where(short[:, None], np.nan, gamma),
        diff_noise_var=np.where(short, nan, dvar / 2.0),
        lam=np.where(told, lam, nan),
        slow=np.where(told, slow, nan),
        white=np.where(told, white, nan),
        note=tuple(notes),
    )


# ---------------------------------------------------------------------------------------
# Conversion to per-completion units
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerCompletion:
    """Per-completion figures for each series ((S,) arrays), NaN where they cannot be
    told; `how` says per series which conversion was used, or why none could be."""

    sigma: np.ndarray  # per-completion reward sd of the label
    drift_per_completion: np.ndarray  # level change per completion of that label
    n_envs: np.ndarray  # N implied (c / lambda) or given
    label_per_epoch: np.ndarray  # c given or implied (lambda N)
    how: tuple[str, ...]


def _broadcast(value: float | np.ndarray | None, size: int) -> np.ndarray:
    if value is None:
        return np.full(size, np.nan)
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (size,)).copy()


def to_per_completion(
    estimate: EpochSeriesEstimate,
    label_per_epoch: float | np.ndarray | None = None,
    n_envs: float | np.ndarray | None = None,
    total_per_epoch: float | np.ndarray | None = None,
) -> PerCompletion:
    """Per-completion sigma and drift from epoch-unit estimates and one scale.

    Scales, in order of preference: c (`label_per_epoch`, completions of the label per
    epoch: from a recorded stream, a curriculum stat or the user) with lambda:
    sigma^2 = c (A / lambda + W), N = c / lambda; N (`n_envs`) with lambda:
    sigma^2 = N (A + lambda W), c = lambda N; C alone (`total_per_epoch`, all completions
    per epoch): sigma^2 = C W, with W ~ Var(diff) / 2 when lambda is not told (an upper
    bound: it adds A (g - h^2)). Drift per completion of the label = beta / c."""
    size = estimate.n.size
    c = _broadcast(label_per_epoch, size)
    envs = _broadcast(n_envs, size)
    total = _broadcast(total_per_epoch, size)
    lam, slow, white, beta = estimate.lam, estimate.slow, estimate.white, estimate.drift_per_epoch
    sigma = np.full(size, np.nan)
    implied_envs = envs.copy()
    implied_c = c.copy()
    how: list[str] = []
    for s in range(size):  # one conversion per series: a few scalar branches
        told = math.isfinite(lam[s])
        if told and math.isfinite(c[s]):
            implied_envs[s] = c[s] / lam[s]
            sigma[s] = math.sqrt(c[s] * (slow[s] / lam[s] + white[s]))
            how.append(
                f"sigma = sqrt(c (A/lambda + W)) = sqrt({c[s]:.3g} x ({slow[s]:.3g}/"
                f"{lam[s]:.3g} + {white[s]:.3g})) = {sigma[s]:.3g}; "
                f"N = c / lambda = {c[s]:.3g} / {lam[s]:.3g} = {implied_envs[s]:.3g}"
            )
        elif told and math.isfinite(envs[s]):
            implied_c[s] = lam[s] * envs[s]
            sigma[s] = math.sqrt(envs[s] * (slow[s] + lam[s] * white[s]))
            how.append(
                f"sigma = sqrt(N (A + lambda W)) = sqrt({envs[s]:.3g} x ({slow[s]:.3g} + "
                f"{lam[s]:.3g} x {white[s]:.3g})) = {sigma[s]:.3g}; "
                f"c = lambda N = {lam[s]:.3g} x {envs[s]:.3g} = {implied_c[s]:.3g}"
            )
        elif math.isfinite(total[s]) and (told or math.isfinite(estimate.diff_noise_var[s])):
            w = white[s] if told else estimate.diff_noise_var[s]
            sigma[s] = math.sqrt(total[s] * w)
            source = "W" if told else "Var(diff)/2, an upper bound on W"
            how.append(
                f"sigma = sqrt(C W) = sqrt({total[s]:.3g} x {w:.3g}) = {sigma[s]:.3g} "
                f"(W from {source})"
            )
        else:
            reason = estimate.note[s] or "lambda told"
            how.append(
                "per-completion sigma cannot be told: it needs c (completions of the label "
                "per epoch) or N (environments) together with lambda, or C (all completions "
                f"per epoch); {reason}"
            )
    with np.errstate(invalid="ignore", divide="ignore"):
        drift = beta / implied_c
    return PerCompletion(
        sigma=sigma,
        drift_per_completion=drift,
        n_envs=implied_envs,
        label_per_epoch=implied_c,
        how=tuple(how),
    )
