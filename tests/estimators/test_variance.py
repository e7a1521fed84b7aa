"""The paper's central claim on the analytic model: DReG-IWAE has lower inference-gradient
variance than IWAE, and IWAE's SNR falls with K while DReG-IWAE's grows.

SNR follows the original code: sqrt(sum_i E[g_i]^2 / sum_i Var[g_i]) over the coordinates of
the inference gradient (debiased by Var/N, see ``cases.snr``). The effects are orders of
magnitude, so the margins below (factors of 2) leave ample room for Monte Carlo error.
"""

from __future__ import annotations

import pytest

from dreg.analytic import GaussianModel, snr
from tests.estimators.cases import sample_gradients

NUM_DRAWS = 2000
KS = (4, 64, 256)


@pytest.fixture(scope="module")
def gradients():
    model = GaussianModel.default()
    return {
        k: {
            n: g[1]
            for n, g in sample_gradients(
                model, k, NUM_DRAWS, ["iwae", "dreg_iwae"], seed=31 + k
            ).items()
        }
        for k in KS
    }


def test_dreg_iwae_has_lower_variance_than_iwae_at_k64(gradients):
    g = gradients[64]
    assert g["dreg_iwae"].var(0).sum() < 0.5 * g["iwae"].var(0).sum()
    assert (g["dreg_iwae"].var(0) < g["iwae"].var(0)).all()  # every coordinate


def test_iwae_snr_falls_with_k_and_dreg_iwae_snr_does_not(gradients):
    iwae = [snr(gradients[k]["iwae"]) for k in KS]
    dreg = [snr(gradients[k]["dreg_iwae"]) for k in KS]
    assert iwae[0] > 2 * iwae[1] > 0 and iwae[1] > iwae[2]
    assert dreg[0] * 2 < dreg[1] < dreg[2]
    assert dreg[2] > 10 * iwae[2]
