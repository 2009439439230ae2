"""The explorer's precomputed data: what the page shows is what the library computes."""

import base64
import json

import numpy as np
import pytest
import torch

import bistochastic as bs
from bistochastic import explorer


@pytest.fixture(scope="module")
def data():
    return explorer.precompute(ns=(3, 6), tau_exp=(-2, 0, 2), scale_exp=(0, 1), iters=(1, 5, 200))


def _plan(case, n):
    q = np.frombuffer(base64.b64decode(case["plan"]), dtype=np.uint8).reshape(n, n)
    return q / 255 * case["vmax"]


def test_grids_and_ratio_index(data):
    assert data["ratio_exp"] == sorted({j - k for j in (0, 1) for k in (-2, 0, 2)})
    assert len(data["viridis"]) == 256
    for n in (3, 6):
        assert len(data["cases"][str(n)]) == len(data["ratio_exp"])
        assert all(len(r) == 3 for r in data["cases"][str(n)])


def test_values_agree_with_the_library(data):
    n, r_idx, k_idx = 6, 2, 1
    r, K = data["ratio_exp"][r_idx], data["iters"][k_idx]
    S = torch.randn(n, n, generator=torch.Generator().manual_seed(0 + n), dtype=torch.float64)
    res = bs.project_dsm(S, tau=2.0 ** (-r), n_iter=K, engine="log", momentum=None)
    case = data["cases"][str(n)][r_idx][k_idx]
    sv = torch.linalg.svdvals(res.plan)
    assert case["sigma2"] == pytest.approx(float(sv[1]), rel=1e-3)  # stored at 4 digits
    assert case["err"] == pytest.approx(float(res.marginal_error), rel=1e-3)
    # 8-bit image of the plan: within half a quantisation step of the max entry
    assert np.abs(_plan(case, n) - res.plan.numpy()).max() <= case["vmax"] / 255


def test_more_sweeps_reduce_the_marginal_error_and_sigma2_is_below_one(data):
    for n in ("3", "6"):
        for per_iter in data["cases"][n]:
            assert per_iter[-1]["err"] <= per_iter[0]["err"] + 1e-12
            assert per_iter[-1]["sigma2"] <= 1.0 + 1e-3  # a converged DSM never expands


def test_javascript_is_a_script_assignment(data):
    js = explorer.to_javascript(data)
    assert js.startswith("window.BS_EXPLORER = ") and js.rstrip().endswith(";")
    assert json.loads(js[len("window.BS_EXPLORER = "):].rstrip().rstrip(";")) == data
    with pytest.raises(ValueError, match="name"):
        explorer.to_javascript(data, name="bad name")


def test_full_grid_is_small_enough_to_embed():
    d = explorer.precompute(ns=(32,), tau_exp=explorer.DEFAULT_TAU_EXP, iters=(1,))
    assert len(explorer.to_javascript(d)) < 60_000  # the largest n dominates the page weight


def test_bad_input_raises():
    with pytest.raises(ValueError, match="n must be"):
        explorer.precompute(ns=(1,))
    with pytest.raises(ValueError, match="sweeps"):
        explorer.precompute(iters=(0,))
    with pytest.raises(ValueError, match="non-empty"):
        explorer.precompute(ns=())


# --- phase diagrams of the conclusion ---------------------------------------------------------


def test_homogeneity_phase_agrees_with_the_library():
    tp = explorer.homogeneity_phase(ns=(4, 8), taus=(0.3, 1.0, 3.0), batch=3, delta=0.01)
    assert tp.sigma2.shape == (2, 3) and tp.leff.shape == (2, 3) and tp.law_leff.shape == (2, 3)
    # sigma_2 falls with tau at every n (the Homogeneity Trap: 3 well separated temperatures)
    assert (np.diff(tp.sigma2, axis=1) < 0).all()
    S = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ref = bs.spectral.sigma2(bs.project_dsm(S, tau=1.0, tol=1e-10).plan).mean()
    assert tp.sigma2[1, 1] == pytest.approx(float(ref), abs=2e-4)  # stored at 4 decimals
    assert tp.leff[1, 1] == float(bs.spectral.effective_depth_constant(tp.sigma2[1, 1], 0.01))
    assert tp.law_leff[1, 2] == pytest.approx(
        float(bs.spectral.effective_depth_law(3.0, 8, 0.01)))


def test_cooling_phase_agrees_with_run_schedule():
    cp = explorer.cooling_phase(rates=(0.05, 0.3), N=6, K=5, eps_min=0.3, n_eps=4)
    assert cp.error.shape == (2, 3) and (cp.eps > 0.3).all()
    # faster cooling, larger error at the coldest grid point (a factor 6 in the rate)
    assert cp.error[1, -1] > cp.error[0, -1]
    from bistochastic import anneal

    C = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T = int(np.ceil(np.log(0.3) / np.log(0.7))) + 1
    run = anneal.run_schedule(anneal.Exponential(1.0, 0.7, 0.3), C, T, n_iter=5, warm_start=True,
                              reference=True, norm="per_row")
    assert cp.error[1, -1] == pytest.approx(run.value_at(cp.eps[-1] * (1 + 1e-9), "error"))


def test_crossing_interpolates_and_reports_none():
    x = np.array([1.0, 2.0, 4.0])
    assert explorer.crossing(x, np.array([1.0, 2.0, 4.0]), 2.0) == pytest.approx(2.0)
    assert explorer.crossing(x, np.array([1.0, 1.0, 4.0]), 2.0) == pytest.approx(2 ** 1.5)
    assert explorer.crossing(x, np.array([1.0, 1.0, 1.0]), 2.0) is None


def test_phase_inputs_are_checked():
    with pytest.raises(ValueError, match="n must be"):
        explorer.homogeneity_phase(ns=(1,))
    with pytest.raises(ValueError, match="delta"):
        explorer.homogeneity_phase(ns=(4,), taus=(1.0,), delta=2.0)
    with pytest.raises(ValueError, match="rate"):
        explorer.cooling_phase(rates=(1.5,))


# --- the notebook widget ----------------------------------------------------------------------


def test_case_matches_the_precomputed_page_data():
    d = explorer.precompute(ns=(6,), tau_exp=(1,), scale_exp=(0,), iters=(5,))
    c = explorer.case(6, tau=2.0, scale=1.0, n_iter=5)
    assert d["cases"]["6"][0][0]["sigma2"] == pytest.approx(c["sigma2"], rel=1e-3)
    assert d["cases"]["6"][0][0]["err"] == pytest.approx(c["err"], rel=1e-3)
    with pytest.raises(ValueError, match="n_iter"):
        explorer.case(6, 1.0, n_iter=0)


def test_widget_sliders_recompute(monkeypatch):
    pytest.importorskip("ipywidgets")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    box = explorer.widget(ns=(4, 8), tau_exp=(-2, 0, 2), scale_exp=(0, 1), iters=(2, 20))
    assert set(box.controls) == {"tau", "n", "iters", "scale"}
    before = (box.readout.value, box.state["sigma2"])
    box.controls["tau"].value = 2  # tau = 4: much flatter
    assert box.readout.value != before[0] and box.state["sigma2"] < before[1]
    ref = explorer.case(box.controls["n"].value, 4.0, 1.0, box.controls["iters"].value)
    assert box.state["sigma2"] == pytest.approx(ref["sigma2"])
    box.controls["tau"].value = -2  # tau = 1/4: cold, two sweeps leave a visible error
    err20 = box.state["err"]
    box.controls["iters"].value = 2
    assert box.state["err"] > 10 * err20  # 2 vs 20 sweeps at a cold temperature
    assert f"{box.state['sigma2']:.4g}" in box.readout.value


def test_library_imports_without_ipywidgets():
    import subprocess
    import sys

    code = ("import sys; sys.modules['ipywidgets'] = None\n"
            "import bistochastic as bs\n"
            "bs.explorer.case(4, 1.0)\n"
            "try:\n    bs.explorer.widget()\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "pip install" in r.stdout
