"""DVAR against its plain reference on synthetic traces; sparse replay; presets and config resolution."""
import math

import numpy as np
import pytest

from t2i_fast.config import TrainConfig
from t2i_fast.errors import UserError
from t2i_fast.methods import get_method, with_defaults
from t2i_fast.stopping import DVAR, dvar_ratio_ref, replay, settings_from_config


def traces(n=600, seed=0):
    rng = np.random.default_rng(seed)
    s = np.arange(n)
    return {
        "flat": np.full(n, 0.3) + 1e-3 * rng.standard_normal(n),
        "decaying": 0.1 + np.exp(-s / 80),
        "noisy": 0.1 + np.exp(-s / 80) + 0.05 * rng.standard_normal(n),
        "constant": np.full(n, 0.25),
        "large_offset": 1e4 + np.exp(-s / 50) + 1e-3 * rng.standard_normal(n),
        "linear": 1.0 - s / n,
    }


@pytest.mark.parametrize("name", list(traces()))
@pytest.mark.parametrize("window", [2, 7, 50])
def test_streaming_matches_reference(name, window):
    trace = traces()[name]
    crit = DVAR(window, 0.15)
    for i, x in enumerate(trace):
        r = crit.update(x)
        ref = dvar_ratio_ref(trace[: i + 1], window)
        if ref is None:
            assert r is None
        else:
            assert math.isfinite(r)
            assert r == pytest.approx(ref, rel=1e-7, abs=1e-12), (i, r, ref)


def test_constant_history_never_stops_and_never_divides_by_zero():
    crit = DVAR(5, 0.15)
    for _ in range(100):
        r = crit.update(0.25)
    assert r == 1.0 and not crit.should_stop()
    assert dvar_ratio_ref([0.25] * 10, 5) == 1.0


def test_decaying_trace_stops_once_plateaued_and_flat_noise_does_not():
    t = traces()
    stop, _ = replay(t["decaying"], 50, 0.15)
    assert stop is not None and 50 <= stop < 600
    ref = next(i for i in range(49, 600) if dvar_ratio_ref(t["decaying"][: i + 1], 50) < 0.15)
    assert stop == ref
    # white noise around a constant: the window varies as much as the whole history, r ~ 1
    stop, ratios = replay(t["flat"], 50, 0.15)
    assert stop is None and min(r for _, r in ratios if r is not None) > 0.3


def test_non_finite_values_are_skipped():
    crit = DVAR(3, 0.15)
    for x in [1.0, 0.5, float("nan"), 0.4, float("inf"), 0.39]:
        crit.update(x)
    assert crit.n == 4
    assert crit.ratio == pytest.approx(dvar_ratio_ref([1.0, 0.5, 0.4, 0.39], 3))


def test_long_run_does_not_drift():
    rng = np.random.default_rng(1)
    trace = 1e3 + np.exp(-np.arange(50_000) / 5000) + 1e-4 * rng.standard_normal(50_000)
    crit = DVAR(310, 0.0)
    for x in trace:
        crit.update(x)
    assert crit.ratio == pytest.approx(dvar_ratio_ref(trace, 310), rel=1e-6)


def test_sparse_replay_uses_scaled_window_and_probe_steps():
    trace = traces()["noisy"]
    stop1, _ = replay(trace, 100, 0.15, every=1)
    for k in (2, 5, 10):
        stop_k, ratios = replay(trace, 100, 0.15, every=k)
        assert all(s % k == 0 for s, _ in ratios)
        assert DVAR(100, 0.15, k).window == math.ceil(100 / k)
        # the sparse value is the dense criterion evaluated on trace[::k]
        sparse = trace[::k]
        j = stop_k // k
        assert dvar_ratio_ref(sparse[: j + 1], math.ceil(100 / k)) < 0.15
        assert abs(stop_k - stop1) <= 0.1 * stop1, (k, stop_k, stop1)


def test_presets_are_the_papers():
    def stop(name):
        p = get_method(name).stop
        return p.window, p.threshold, p.cap

    assert stop("textual_inversion") == (310, 0.15, 6100)
    assert stop("custom_diffusion") == (180, 0.15, 500)
    assert stop("lora") == (440, 0.4, 1000)


def test_settings_from_config():
    cfg = with_defaults(TrainConfig(method="textual_inversion"))
    ti, lora = get_method("textual_inversion").stop, get_method("lora").stop
    s = settings_from_config(cfg, ti)
    assert (s.mode, s.window, s.threshold, s.cap, s.every) == ("dvar", 310, 0.15, cfg.max_steps, 25)
    assert settings_from_config(with_defaults(TrainConfig(method="lora")), lora).every == 36  # auto: N // 12
    s = settings_from_config(cfg.replace(dvar_window=50, dvar_threshold=0.0, probe_every=5), ti)
    assert (s.window, s.threshold, s.every, s.criterion().window) == (50, 0.0, 5, 10)
    few = settings_from_config(cfg.replace(early_stop="few", few_steps=30), ti)
    assert few.last_step == 30 and not few.probing
    assert settings_from_config(cfg.replace(early_stop="none"), ti).last_step == cfg.max_steps
    for bad in (dict(early_stop="sometimes"), dict(dvar_window=1), dict(dvar_threshold=1.5), dict(probe_every=-1)):
        with pytest.raises(UserError):
            settings_from_config(cfg.replace(**bad), ti)
