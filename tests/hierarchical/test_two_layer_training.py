"""model=two_layer through the real configs and command line: training, evaluation, resume,
pictures, compilation, the gradient statistics per stochastic layer and every diagnostic mode.

The CLI and in-process runs use a tiny two-layer net (z1: 4, z2: 2, one hidden layer of 8) on
a slice of real MNIST, so each takes seconds.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from dreg.callbacks.images import SampleAndReconstructionImages
from dreg.checkpointing import load_checkpoint
from dreg.datamodules.binarized import Batch
from dreg.diagnostics.layers import layer_indices
from dreg.estimators import routed_loss
from dreg.estimators.iwae import DReGIWAE
from dreg.gradients import group_parameters
from dreg.hierarchical import TwoLayerVAE
from dreg.lightning_module import DReGModule
from dreg.model import VAE, gaussian_log_prob
from dreg.run import main, train
from tests.conftest import (
    TINY_RUN,
    assert_same_checkpoint_state,
    cli,
    compose_config,
    mnist_dir,
    requires_mnist,
)

SIDE = 28
TINY_NET = ["model=two_layer", "model.net.latent_dims=[4,2]", "model.net.hidden_dims=[[8],[8]]"]


def tiny_net(context_dim: int = 0, seed: int = 0) -> TwoLayerVAE:
    torch.manual_seed(seed)
    data_dim = SIDE * SIDE - context_dim
    return TwoLayerVAE(
        data_dim,
        latent_dims=[4, 2],
        hidden_dims=[[8], [8]],
        train_mean=torch.rand(data_dim) * 0.3,
        context_dim=context_dim,
        context_mean=torch.rand(context_dim) * 0.3 if context_dim else None,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row that logged ``key``."""
    return [(int(float(r["step"])), float(r[key])) for r in rows if r.get(key)]


# -- fast: the pieces on their own ----------------------------------------------------------
def test_one_layer_pictures_are_the_decoded_draws_of_the_seeded_generator():
    # The one-layer VAE's pictures do not change with the two-layer support: decoded
    # standard-normal draws of the callback's own generator, and decoded posterior means.
    torch.manual_seed(0)
    net = VAE(data_dim=SIDE * SIDE, latent_dim=4, hidden_dims=[16])
    callback = SampleAndReconstructionImages(dirpath="unused", num_samples=16, columns=4, seed=3)
    eps = torch.randn((16, 4), generator=torch.Generator().manual_seed(3))
    want = torch.sigmoid(net.decoder(eps)).reshape(16, SIDE, SIDE)
    assert torch.equal(callback.samples(net, None), want)
    x = torch.bernoulli(torch.full((2, SIDE * SIDE), 0.3))
    decoded = torch.sigmoid(net.decoder(net.posterior_params(x)[0])).reshape(2, SIDE, SIDE)
    shown = callback.reconstructions(net, Batch(x=x, context=None))
    assert torch.equal(shown[2:], decoded) and torch.equal(shown[:2], x.reshape(2, SIDE, SIDE))


@pytest.mark.parametrize("context_dim", [0, SIDE * SIDE // 2], ids=["mnist", "struct_mnist"])
def test_two_layer_pictures_are_fixed_ancestral_samples_and_leave_the_rng_alone(context_dim):
    net = tiny_net(context_dim)
    callback = SampleAndReconstructionImages(dirpath="unused", num_samples=16, columns=4)
    contexts = torch.bernoulli(torch.full((4, context_dim), 0.3)) if context_dim else None
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = callback.samples(net, contexts), callback.samples(net, contexts)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second) and first.shape == (16, SIDE, SIDE)
    bottom = first.flatten(1)[:, context_dim:]
    assert 0 <= bottom.min() and bottom.max() <= 1
    assert bottom.std(0).max() > 0  # different latent draws, different pictures
    if context_dim:  # the top half of row r is context r
        top = first.flatten(1)[:, :context_dim].reshape(4, 4, context_dim)
        assert torch.equal(top, contexts[:, None].expand(4, 4, -1))
    # Both layers are drawn: other z1 draws with the same z2 draws give other pictures.
    eps = torch.randn(16, net.noise_dim, generator=torch.Generator().manual_seed(0))
    context = None if contexts is None else contexts.repeat_interleave(4, dim=0)
    other = eps.clone()
    other[:, :4] = torch.randn(16, 4)
    assert not torch.equal(net.sample_pixels(eps, context), net.sample_pixels(other, context))

    x = torch.bernoulli(torch.full((3, SIDE * SIDE - context_dim), 0.3))
    images = Batch(x=x, context=None if contexts is None else contexts[:3])
    shown = callback.reconstructions(net, images)
    assert shown.shape == (6, SIDE, SIDE)
    # The decoded mean of q(z1 | x): deterministic, and not the prior's output for z1 = 0.
    assert torch.equal(shown, callback.reconstructions(net, images))
    c = None if contexts is None else (contexts[:3] - net.context_mean)
    at_zero = torch.sigmoid(net.decoder_x(net._with_context(torch.zeros(3, 4), c)))
    assert not torch.allclose(shown[3:].flatten(1)[:, context_dim:], at_zero)


def test_layer_indices_split_the_inference_gradient_into_its_two_layers():
    net = tiny_net()
    _, params = group_parameters(net, "inference")
    layers = layer_indices(net, params)
    assert list(layers) == ["inference_layer1", "inference_layer2"]
    every = torch.cat(list(layers.values()))
    total = sum(p.numel() for p in params)
    assert torch.equal(every.sort().values, torch.arange(total))  # a partition
    assert layers["inference_layer1"].numel() == sum(p.numel() for p in net.encoder_z1.parameters())
    assert layer_indices(VAE(SIDE * SIDE, latent_dim=4, hidden_dims=[8]), params) == {}
    with pytest.raises(ValueError, match="not inference parameters"):
        layer_indices(net, list(net.encoder_z1.parameters()))


def test_compile_wraps_every_network_of_the_two_layer_net_and_keeps_its_keys():
    eager = DReGModule(tiny_net(392), DReGIWAE(), torch.optim.Adam, num_samples=4)
    compiled = DReGModule(tiny_net(392), DReGIWAE(), torch.optim.Adam, compile="mlps")
    mlps = compiled.net.mlps()
    assert all(m._compiled_call_impl is not None for m in mlps)
    covered = {id(p) for m in mlps for p in m.parameters()}
    assert covered == {id(p) for p in compiled.net.parameters()}  # nothing left eager
    assert list(eager.state_dict()) == list(compiled.state_dict())  # checkpoints interchange


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C compiler",
)
def test_compiled_two_layer_gradients_match_eager():
    grads = []
    for compile_ in (False, "mlps"):
        module = DReGModule(tiny_net(), DReGIWAE(), torch.optim.Adam, compile=compile_)
        x = torch.bernoulli(torch.full((8, SIDE * SIDE), 0.3))
        torch.manual_seed(1)
        particles = module.net.particles(x, 16)
        routed_loss(particles, module.estimator(particles.log_w)).backward()
        grads.append([p.grad for p in module.net.parameters()])
    for got, want in zip(grads[1], grads[0], strict=True):
        # Inductor fuses and reorders float32 reductions: equal up to rounding, not bitwise.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- real runs on MNIST ---------------------------------------------------------------------
TRAIN = [*TINY_RUN, *TINY_NET, "dataset.train_subset=4000", "trainer.log_every_n_steps=10"]


CLI_ESTIMATORS = ["dreg_iwae", "dreg_rws"]


@requires_mnist
@pytest.mark.slow
def test_two_layer_cli_runs_train_and_a_resume_continues_each_exactly(tmp_path):
    """Each estimator trained straight to 300 steps, and to 200 then resumed to 300. The two
    estimators are the two jobs of one sweep (``-m``) per command: three processes instead of
    one per estimator and command."""
    run = ["-m", *TRAIN, f"estimator={','.join(CLI_ESTIMATORS)}",
           "trainer.val_check_interval=100", "hydra.sweep.subdir=${hydra:job.num}"]  # fmt: skip
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    result = cli(*run, "trainer.max_steps=300", f"hydra.sweep.dir={straight}")
    assert result.returncode == 0, result.stderr[-3000:]
    for job, estimator in enumerate(CLI_ESTIMATORS):
        metrics = json.loads((straight / str(job) / "metrics.json").read_text())
        assert metrics["global_step"] == 300, estimator
        assert math.isfinite(metrics["test/log_likelihood"]), estimator
        # The model improves: the validation log-likelihood rises at every validation (100,
        # 200, 300), by about 2 nats each here. The validation images and their bits are
        # fixed, so the only noise is the S = 50-sample estimate, a few tenths of a nat over
        # 50 images; a batch's training bound is far noisier (~10 nats from batch to batch).
        val = column(read_csv(straight / str(job) / "csv" / "metrics.csv"), "val/log_likelihood")
        assert [s for s, _ in val] == [100, 200, 300], estimator
        gains = [b - a for (_, a), (_, b) in pairwise(val)]
        assert all(g > 1 for g in gains), (estimator, val)
        # S = 50 samples beat K = 8
        assert metrics["test/log_likelihood"] > metrics["test/bound"], estimator

    result = cli(*run, "trainer.max_steps=200", f"hydra.sweep.dir={extended}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli(*run, "trainer.max_steps=300", "resume=true", f"hydra.sweep.dir={extended}")
    assert result.returncode == 0, result.stderr[-3000:]
    for job, estimator in enumerate(CLI_ESTIMATORS):
        resumed = extended / str(job)
        assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 300, estimator
        # 200 steps and a resume to 300 are the 300-step run, weights and Adam state alike.
        got = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
        want = load_checkpoint(straight / str(job) / "checkpoints" / "last.ckpt")
        assert want["global_step"] == 300, estimator
        assert_same_checkpoint_state(got, want)


@requires_mnist
@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["struct_mnist", "omniglot"])
def test_two_layer_trains_on_the_other_datasets_with_pictures(dataset, tmp_path):
    overrides = [*TINY_RUN, *TINY_NET, f"dataset={dataset}"]
    if dataset == "omniglot":
        lake = mnist_dir() / "omniglot-lake"
        if not (lake / "omniglot_lake_105x105.npz").exists():
            pytest.skip(f"DREG_DATA_DIR lacks {lake / 'omniglot_lake_105x105.npz'}")
        if not (lake / "omniglot28.npz").exists():  # a read-only data folder: prepare here
            overrides.append(f"dataset.prepared_path={tmp_path / 'omniglot28.npz'}")
    metrics = train(compose_config(overrides, tmp_path))
    assert metrics["global_step"] == 4 and math.isfinite(metrics["test/log_likelihood"])
    assert (tmp_path / "images" / "samples-step000004.png").exists()
    assert (tmp_path / "images" / "reconstructions-step000004.png").exists()


@requires_mnist
@pytest.mark.slow
def test_gradient_statistics_per_layer_are_the_inference_statistics_restricted(tmp_path):
    overrides = [*TINY_RUN, *TINY_NET, "callbacks=estimator_compare", "trainer.max_steps=20",
                 "trainer.log_every_n_steps=5", "estimator=dreg_iwae"]  # fmt: skip
    train(compose_config(overrides, tmp_path))
    rows = read_csv(tmp_path / "csv" / "metrics.csv")
    net = tiny_net()
    sizes = [sum(p.numel() for p in m.parameters()) for m in (net.encoder_z1, net.encoder_z2)]
    steps = [s for s, _ in column(rows, "grad/inference_layer1/snr")]
    assert steps == [5, 10, 15, 20]
    for prefix in ("grad/", "grad/compare/iwae/"):
        for step in steps:
            row = next(r for r in rows if r.get(f"{prefix}inference/snr") and
                       int(float(r["step"])) == step)  # fmt: skip
            var = [float(row[f"{prefix}inference_layer{i}/variance"]) for i in (1, 2)]
            snr = [float(row[f"{prefix}inference_layer{i}/snr"]) for i in (1, 2)]
            # Coordinate means: the whole group's are the size-weighted means of its layers'.
            total_var = sum(n * v for n, v in zip(sizes, var, strict=True)) / sum(sizes)
            mean_sq = sum(n * s * v for n, s, v in zip(sizes, snr, var, strict=True)) / sum(sizes)
            assert float(row[f"{prefix}inference/variance"]) == pytest.approx(total_var, rel=1e-9)
            assert float(row[f"{prefix}inference/snr"]) == pytest.approx(
                mean_sq / total_var, rel=1e-9
            )


# -- the diagnostic modes -------------------------------------------------------------------
MODE = [*TINY_RUN, *TINY_NET, "dataset.train_subset=4000", "mode.batch_size=8"]


def run_mode(tmp_path: Path, *overrides: str) -> None:
    main(compose_config([*MODE, *overrides], tmp_path))


@requires_mnist
@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "biased"), [("dreg_iwae", False), ("stl", True)])
def test_bias_check_on_two_layers_tests_each_layer(estimator, biased, tmp_path):
    run_mode(tmp_path, "mode=bias_check", f"estimator={estimator}", "model.num_samples=16")
    report = json.loads((tmp_path / "bias_check.json").read_text())
    assert [r["name"] for r in report["per_layer"]] == ["inference_layer1", "inference_layer2"]
    net = tiny_net()
    assert [r["numel"] for r in report["per_layer"]] == [
        sum(p.numel() for p in m.parameters()) for m in (net.encoder_z1, net.encoder_z2)
    ]
    assert report["per_tensor"][0]["name"] == "encoder_z1.net.0.weight"
    t = report["aggregate"]["t"]
    if biased:
        assert report["verdict"] == "biased" and abs(t) > 5
    else:
        # Generalized DReG is unbiased for IWAE's gradient, in each layer: |t| < 3.5 (the
        # verdict's Holm correction at alpha = 0.01 allows a little more).
        assert report["verdict"] == "no evidence of bias"
        assert all(abs(r["t"]) < 3.5 for r in [report["aggregate"], *report["per_layer"]])


def naive_propose(self, x, context, eps):
    """TwoLayerVAE.propose as the common DReG implementation writes it: q(z2 | z1)'s *tensors*
    detached in the path term, which drops d log q(z2 | z1) / d z1 (biased for K > 1)."""
    eps1, eps2 = self._split_noise(eps, x)
    c = self.centred_context(context)
    mean1, scale1 = self._q1(x, c)
    z1 = mean1 + scale1 * eps1
    mean2, scale2 = self.encoder_z2(self._with_context(z1, c))
    z2 = mean2 + scale2 * eps2
    stopped = gaussian_log_prob(z1, mean1.detach(), scale1.detach()) + gaussian_log_prob(
        z2, mean2.detach(), scale2.detach()
    )
    z1_fixed, z2_fixed = z1.detach(), z2.detach()
    score = gaussian_log_prob(z1_fixed, mean1, scale1) + gaussian_log_prob(
        z2_fixed, *self.encoder_z2(self._with_context(z1_fixed, c))
    )
    return torch.cat([z1, z2], dim=-1), stopped, score


@requires_mnist
@pytest.mark.slow
def test_bias_check_finds_the_tensor_detach_dreg_biased_in_layer_1_only(tmp_path, monkeypatch):
    monkeypatch.setattr(TwoLayerVAE, "propose", naive_propose)
    # 800 batches: the dropped terms are small at this fresh model (layer 1's output-bias
    # tensor reaches t = 7; 200 batches would give half that).
    run_mode(tmp_path, "mode=bias_check", "estimator=dreg_iwae", "model.num_samples=16",
             "mode.num_batches=800")  # fmt: skip
    report = json.loads((tmp_path / "bias_check.json").read_text())
    assert report["verdict"] == "biased"
    rejected = [r["name"] for r in report["per_tensor"] if r["holm_reject"]]
    assert rejected and all(name.startswith("encoder_z1.") for name in rejected), rejected
    # Layer 2's parameters get exactly generalized DReG's gradient: no bias there.
    layer2 = [r for r in report["per_tensor"] if r["name"].startswith("encoder_z2.")]
    assert all(abs(r["t"]) < 3 for r in [*layer2, report["per_layer"][1]]), layer2


@requires_mnist
@pytest.mark.slow
def test_diagnose_on_two_layers_adds_the_snr_of_each_layer(tmp_path):
    run_mode(tmp_path, "mode=diagnose", "mode.num_samples=[1,16]",
             "mode.estimators=[iwae,dreg_iwae]", "mode.num_draws=100")  # fmt: skip
    with (tmp_path / "snr_vs_k.csv").open() as f:
        rows = {(int(r["num_samples"]), r["estimator"], r["group"]): r for r in csv.DictReader(f)}
    groups = ("model", "inference", "inference_layer1", "inference_layer2")
    assert set(rows) == {(k, e, g) for k in (1, 16) for e in ("iwae", "dreg_iwae") for g in groups}
    assert (tmp_path / "snr_vs_k.png").stat().st_size > 10_000

    def snr(k: int, estimator: str, group: str) -> float:
        return float(rows[k, estimator, group]["snr"])

    # The same model coefficients in both estimators: the same model gradients.
    assert snr(16, "dreg_iwae", "model") == pytest.approx(snr(16, "iwae", "model"), rel=1e-9)

    # DReG beats IWAE in each layer at K = 16 (Tucker et al. 2019), on the same draws. A
    # 100-draw SNR or variance is good to ~15% (relative standard error sqrt(2 / 99) per
    # coordinate, less once averaged); at this freshly initialised model the gain is large in
    # layer 1 (SNR x2.8, variance x0.36) and smaller in layer 2 (x1.4, x0.67).
    def variance(estimator: str, group: str) -> float:
        return float(rows[16, estimator, group]["variance"])

    assert snr(16, "dreg_iwae", "inference_layer1") > 2 * snr(16, "iwae", "inference_layer1")
    assert variance("dreg_iwae", "inference_layer1") < 0.5 * variance("iwae", "inference_layer1")
    assert snr(16, "dreg_iwae", "inference_layer2") > snr(16, "iwae", "inference_layer2")
    assert variance("dreg_iwae", "inference_layer2") < 0.85 * variance("iwae", "inference_layer2")
    # The layers' variances average to the group's, weighted by their sizes.
    net = tiny_net()
    sizes = {
        "inference_layer1": sum(p.numel() for p in net.encoder_z1.parameters()),
        "inference_layer2": sum(p.numel() for p in net.encoder_z2.parameters()),
    }
    var = {g: float(rows[16, "iwae", g]["variance"]) for g in groups[1:]}
    weighted = sum(sizes[g] * var[g] for g in groups[2:]) / sum(sizes.values())
    assert var["inference"] == pytest.approx(weighted, rel=1e-9)


@requires_mnist
@pytest.mark.slow
def test_snr_vs_k_experiment_runs_every_estimator_on_two_layers(tmp_path):
    run_mode(tmp_path, "experiment=snr_vs_k", "mode.num_samples=[2,8]", "mode.num_draws=10")
    with (tmp_path / "snr_vs_k.csv").open() as f:
        rows = list(csv.DictReader(f))
    estimators = ["iwae", "stl", "dreg_iwae", "rws", "dreg_rws", "jvi", "dreg_jvi"]
    assert len(rows) == 2 * len(estimators) * 4  # K x estimators x (model, inference, 2 layers)
    assert {r["estimator"] for r in rows} == set(estimators)
    assert all(math.isfinite(float(r["variance"])) and float(r["variance"]) > 0 for r in rows)
