"""mode=bias_check and mode=diagnose on a small MNIST model trained for a bit (in process)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dreg.run import main, train
from tests.conftest import TINY_RUN, compose_config, requires_mnist

pytestmark = [requires_mnist, pytest.mark.slow]

# A smaller model and batch than the paper's so the default 200 batches take seconds.
SMALL = [
    "model.net.hidden_dims=[64]",
    "model.net.latent_dim=10",
    "dataset.train_subset=4000",
    "mode.batch_size=8",
]


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """A checkpoint after 400 IWAE steps: q is no longer the prior-like initial encoder."""
    out = tmp_path_factory.mktemp("trained")
    steps = ["trainer.max_steps=400", "trainer.val_check_interval=400"]
    train(compose_config([*TINY_RUN, *SMALL[:3], *steps, "trainer.log_every_n_steps=50"], out))
    return out / "checkpoints" / "last.ckpt"


def run_mode(tmp_path: Path, *overrides: str) -> None:
    main(compose_config([*TINY_RUN, *SMALL, *overrides], tmp_path))


@pytest.mark.parametrize(
    ("estimator", "biased"),
    [("stl", True), ("dreg_iwae", False), ("dreg_rws", False), ("dreg_jvi", False),
     ("dreg_miwae", False), ("dreg_piwae", False)],
)  # fmt: skip
def test_bias_check_flags_stl_and_clears_dreg(estimator, biased, trained_ckpt, tmp_path):
    run_mode(tmp_path, "mode=bias_check", f"estimator={estimator}", f"ckpt_path={trained_ckpt}",
             "model.num_samples=64")  # fmt: skip
    report = json.loads((tmp_path / "bias_check.json").read_text())
    assert report["num_batches"] == 200  # the default
    # Each family's reference is the estimator of that name (dreg_miwae: miwae, same groups).
    assert report["reference"] == report["family"]
    assert report["family"] == {"dreg_miwae": "miwae", "dreg_piwae": "piwae"}.get(
        estimator, report["family"]
    )
    t = report["aggregate"]["t"]
    if biased:
        assert abs(t) > 5 and report["verdict"] == "biased"
    else:
        assert abs(t) < 3 and report["verdict"] == "no evidence of bias"
    names = [r["name"] for r in report["per_tensor"]]
    assert names[0] == "encoder.net.0.weight" and len(names) == 4  # one hidden layer: 2 x (W, b)
    assert report["largest_tensor"]["name"] in names


def test_bias_check_of_the_reference_itself_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reference of the iwae family"):
        run_mode(tmp_path, "mode=bias_check", "estimator=iwae")


def test_bias_check_of_a_mixed_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="family 'mixed', which has no reference"):
        run_mode(tmp_path, "mode=bias_check", "estimator=dreg_alpha", "estimator.alpha=0.5")


def read_rows(path: Path) -> dict[tuple[int, str, str], float]:
    with path.open() as f:
        return {(int(r["num_samples"]), r["estimator"], r["group"]): float(r["snr"])
                for r in csv.DictReader(f)}  # fmt: skip


def test_diagnose_snr_falls_with_k_for_iwae_not_for_dreg(trained_ckpt, tmp_path):
    run_mode(tmp_path, "mode=diagnose", f"ckpt_path={trained_ckpt}", "mode.num_samples=[1,8,64]",
             "mode.estimators=[iwae,dreg_iwae]", "mode.num_draws=100")  # fmt: skip
    snr = read_rows(tmp_path / "snr_vs_k.csv")
    assert len(snr) == 3 * 2 * 2
    assert (tmp_path / "snr_vs_k.png").stat().st_size > 10_000
    # Margins are several Monte Carlo standard errors of these 100-draw estimates (~10%).
    # On this small model the signal itself shrinks with K, so the robust statements are
    # relative: IWAE's SNR falls, DReG's falls far less, and DReG's lead grows with K.
    iwae = {k: snr[k, "iwae", "inference"] for k in (1, 8, 64)}
    dreg = {k: snr[k, "dreg_iwae", "inference"] for k in (1, 8, 64)}
    assert iwae[64] < iwae[1] / 2
    assert dreg[64] / dreg[1] > 2 * iwae[64] / iwae[1]
    assert dreg[64] > 3 * iwae[64]
    # K = 1: DReG-IWAE is STL, whose path-only gradient already beats IWAE's (Roeder et al.).
    assert snr[1, "dreg_iwae", "inference"] > snr[1, "iwae", "inference"]
    # Same model coefficients (w~) in both estimators: identical model gradients.
    assert snr[64, "dreg_iwae", "model"] == pytest.approx(snr[64, "iwae", "model"], rel=1e-9)


def test_diagnose_skips_a_k_that_is_not_a_multiple_of_the_groups(trained_ckpt, tmp_path, caplog):
    """miwae's default M = 8: K = 4 is skipped with a note, K = 16 is measured (K' = 2)."""
    with caplog.at_level("INFO"):
        run_mode(tmp_path, "mode=diagnose", f"ckpt_path={trained_ckpt}", "mode.num_samples=[4,16]",
                 "mode.estimators=[iwae,miwae,dreg_miwae]", "mode.num_draws=4")  # fmt: skip
    snr = read_rows(tmp_path / "snr_vs_k.csv")
    assert {(k, e) for k, e, _ in snr} == {(4, "iwae"), (16, "iwae"), (16, "miwae"),
                                            (16, "dreg_miwae")}  # fmt: skip
    assert "skipping miwae at K=4: estimator 'miwae' splits" in caplog.text
