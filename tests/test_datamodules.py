"""MNIST and struct-MNIST DataModules on the real files, and the VAE's optional context.

Data-dependent tests read ``$DREG_DATA_DIR`` (CI sets it) and are skipped, with the reason,
when it is unset or lacks the MNIST files. Statistical checks use fixed seeds and tolerances of
4 Monte-Carlo standard errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dreg.datamodules.mnist import IMAGE_FILES, MNISTDataModule
from dreg.datamodules.struct_mnist import CONTEXT_DIM, StructMNISTDataModule
from dreg.estimators import IWAE
from dreg.model import VAE
from dreg.step import Replicas, ReplicaSpec

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def mnist_dir() -> Path:
    """``$DREG_DATA_DIR`` if it holds the MNIST image files, else skip the test."""
    root = os.environ.get("DREG_DATA_DIR")
    if not root:
        pytest.skip("DREG_DATA_DIR is not set (point it at the folder holding MNIST/raw/)")
    missing = [n for n in IMAGE_FILES if not (Path(root) / "MNIST" / "raw" / n).exists()]
    if missing:
        pytest.skip(f"DREG_DATA_DIR={root} lacks MNIST/raw/{missing}")
    return Path(root)


@pytest.fixture(scope="module")
def mnist() -> MNISTDataModule:
    dm = MNISTDataModule(mnist_dir(), download=False)
    dm.setup()
    return dm


def binarize_as_in_training(grey: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a training step sees: :meth:`dreg.step.Replicas.draw` binarizes each step's rows."""
    net = VAE(data_dim=grey.shape[1], latent_dim=2, hidden_dims=[4])
    params = {name: p.unsqueeze(0) for name, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    spec = ReplicaSpec(IWAE(), generator, skip_nonfinite=False)
    replicas = Replicas(net, params, {}, optimizer, [spec], num_samples=1)
    bits, _ = replicas.draw(grey.unsqueeze(0))
    return bits[0]


# -- MNIST on the real files ------------------------------------------------------------------
def test_mnist_split_sizes_and_ranges(mnist: MNISTDataModule) -> None:
    sizes = {name: tuple(data.shape) for name, data in mnist.splits.items()}
    assert sizes == {"train": (50000, 784), "val": (10000, 784), "test": (10000, 784)}
    train = mnist.splits["train"]
    assert train.dtype == torch.float32 and train.min() == 0 and train.max() == 1
    assert (train * 255 - (train * 255).round()).abs().max() < 1e-4  # grey levels k / 255
    # The shared data's README: training-file pixel mean 33.318 / 255.
    assert abs(torch.cat([train, mnist.splits["val"]]).mean().item() * 255 - 33.318) < 0.01
    for name in ("val", "test"):  # evaluation images are binarized once, at setup
        assert set(mnist.splits[name].unique().tolist()) == {0.0, 1.0}


def test_mnist_validation_is_the_end_of_the_training_file(mnist: MNISTDataModule) -> None:
    train_file, _ = mnist.read_images()
    assert torch.equal(mnist.splits["train"], train_file[:50000])
    val_grey = train_file[50000:]
    assert ((mnist.splits["val"] == 1) <= (val_grey > 0)).all()  # ink only where there is ink


def test_training_binarization_statistics(mnist: MNISTDataModule) -> None:
    generator = torch.Generator().manual_seed(0)
    grey = mnist.splits["train"][:500]  # [B, D]
    draws = 100
    bits = torch.stack([binarize_as_in_training(grey, generator) for _ in range(draws)])
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    assert (bits[:, grey == 0] == 0).all() and (bits[:, grey == 1] == 1).all()
    # The overall mean of independent Bernoulli(p) bits: variance sum p(1-p) / (N * count)^2.
    se = (grey * (1 - grey)).sum().sqrt() / (draws**0.5 * grey.numel())
    assert abs(bits.mean() - grey.mean()) < 4 * se
    # Per pixel, with N draws: the standardized errors of every grey pixel are ~ N(0, 1).
    grey_pixels = (grey > 0) & (grey < 1)
    z = (bits.mean(0) - grey)[grey_pixels] / (grey * (1 - grey) / draws).sqrt()[grey_pixels]
    assert abs(z.mean()) < 4 / z.numel() ** 0.5
    assert abs(z.var() - 1) < 0.1  # tens of thousands of pixels: SE of the variance ~0.01


def test_training_binarization_is_dynamic(mnist: MNISTDataModule) -> None:
    grey = mnist.splits["train"][:64]
    generator = torch.Generator().manual_seed(0)
    first, second = (binarize_as_in_training(grey, generator) for _ in range(2))
    assert not torch.equal(first, second)
    # The same generator state draws the same bits: a job's draws depend on its seed only.
    again = binarize_as_in_training(grey, torch.Generator().manual_seed(0))
    assert torch.equal(again, first)
    assert mnist.on_after_batch_transfer(grey, 0).x is grey  # no trainer: evaluation, no draw


def test_eval_binarization_is_fixed_and_seeded(mnist: MNISTDataModule) -> None:
    root = mnist_dir()
    same = MNISTDataModule(root, download=False, eval_subset=2000)
    other = MNISTDataModule(root, download=False, eval_subset=2000, binarization_seed=1)
    same.setup(), other.setup()
    for name in ("val", "test"):
        assert torch.equal(same.splits[name], mnist.splits[name][:2000])
        assert not torch.equal(other.splits[name], same.splits[name])
    # The fixed draw is still an unbiased binarization of the grey test images.
    _, grey = mnist.read_images()
    se = (grey * (1 - grey)).sum().sqrt() / grey.numel()
    assert abs(mnist.splits["test"].mean() - grey.mean()) < 4 * se


def test_datamodules_with_the_same_settings_share_one_copy_of_the_data() -> None:
    """The jobs of a pack (dreg.pack) hold one copy of the images, not one each."""
    first = MNISTDataModule(mnist_dir(), download=False, train_subset=1000)
    first.setup()
    same = MNISTDataModule(mnist_dir(), download=False, train_subset=1000)
    same.setup()
    other = MNISTDataModule(mnist_dir(), download=False, train_subset=2000)
    other.setup()
    for split in ("train", "val", "test"):
        assert same.splits[split].data_ptr() == first.splits[split].data_ptr()
    assert other.splits["train"].data_ptr() != first.splits["train"].data_ptr()
    assert torch.equal(other.splits["train"][:1000], first.splits["train"])


def test_mnist_loaders_batch_shapes(mnist: MNISTDataModule) -> None:
    # Training calls get the row indices of their steps' batches ([steps, B]); the step
    # gathers and binarizes them (dreg.step).
    rows = next(iter(mnist.train_dataloader()))
    assert rows.shape == (mnist.steps_per_call, 32)
    assert mnist.splits["train"][rows[0]].shape == (32, 784)
    assert next(iter(mnist.test_dataloader())).shape == (100, 784)


# -- struct-MNIST ---------------------------------------------------------------------------
def test_struct_mnist_halves_and_statistics() -> None:
    dm = StructMNISTDataModule(mnist_dir(), download=False, train_subset=5000, eval_subset=200)
    dm.setup()
    images = dm.splits["test"][:8]
    batch = dm.on_after_batch_transfer(images, 0)
    pixels = images.view(8, 28, 28)
    assert torch.equal(batch.context, pixels[:, :14].reshape(8, CONTEXT_DIM))  # top half
    assert torch.equal(batch.x, pixels[:, 14:].reshape(8, 392))  # bottom half
    kwargs = dm.model_kwargs()
    assert kwargs["data_dim"] == 392 and kwargs["context_dim"] == 392
    train = dm.splits["train"].view(-1, 28, 28)
    # Each statistic on its own half (the original code swapped them).
    torch.testing.assert_close(kwargs["train_mean"], train[:, 14:].mean(0).reshape(392))
    torch.testing.assert_close(kwargs["context_mean"], train[:, :14].mean(0).reshape(392))
    assert (kwargs["train_mean"] - kwargs["context_mean"]).abs().max() > 0.3  # halves differ
    net = VAE(**kwargs)
    expected_bias = torch.logit(kwargs["train_mean"].clamp(1e-3, 1 - 1e-3))
    torch.testing.assert_close(net.decoder[-1].bias, expected_bias)


def test_struct_mnist_rejects_other_widths() -> None:
    dm = StructMNISTDataModule("unused")
    with pytest.raises(ValueError, match=r"struct-MNIST expects \[B, 784\]"):
        dm.split_context(torch.zeros(2, 392))


# -- the VAE's optional context (p(z|c), q(z|x,c), p(x|z,c)) --------------------------------
@pytest.fixture
def conditional_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(data_dim=6, latent_dim=3, hidden_dims=[8], context_dim=4,
               context_mean=torch.full((4,), 0.5))  # fmt: skip


def test_context_enters_prior_encoder_and_decoder(conditional_vae: VAE) -> None:
    net = conditional_vae
    x, z = torch.bernoulli(torch.full((5, 6), 0.5)), torch.randn(2, 5, 3)  # [B, Dx], [K, B, Dz]
    c1, c2 = torch.zeros(5, 4), torch.ones(5, 4)
    assert not torch.allclose(net.posterior_params(x, c1)[0], net.posterior_params(x, c2)[0])
    assert not torch.allclose(net.log_joint(x, z, c1), net.log_joint(x, z, c2))
    # Prior p(z | c): an MLP of the centred context; the decoder bias alone gives p(x | z, c).
    prior_mean, prior_scale = net.prior(c1 - 0.5)
    decoder_in = torch.cat([z, (c1 - 0.5).expand(2, -1, -1)], dim=-1)
    log_lik = torch.distributions.Bernoulli(logits=net.decoder(decoder_in)).log_prob(x).sum(-1)
    log_prior = torch.distributions.Normal(prior_mean, prior_scale).log_prob(z).sum(-1)
    torch.testing.assert_close(net.log_joint(x, z, c1), log_prior + log_lik)
    assert net.log_likelihood(x, 10, c1).shape == (5,)
    with pytest.raises(ValueError, match="needs a context of size 4"):
        net.log_joint(x, z)


def test_context_prior_is_a_model_parameter(conditional_vae: VAE) -> None:
    prior = set(map(id, conditional_vae.prior.parameters()))
    assert prior <= set(map(id, conditional_vae.model_parameters()))
    assert not prior & set(map(id, conditional_vae.inference_parameters()))
    assert VAE(data_dim=6, latent_dim=3, hidden_dims=[8]).prior is None  # unconditional


ESTIMATORS = sorted(p.stem for p in (CONF_DIR / "estimator").glob("*.yaml"))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_the_conditional_model(estimator: str) -> None:
    """struct-MNIST needs nothing from an estimator: each one's routed loss reaches every group."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"estimator={estimator}", "dataset=struct_mnist"])
    torch.manual_seed(0)
    net = VAE(data_dim=392, latent_dim=4, hidden_dims=[16], context_dim=392)
    module = instantiate(cfg.model, net=net, estimator=instantiate(cfg.estimator))
    images = torch.full((1, 3, 784), 0.3)  # [M = 1, B, D] grey levels
    replicas = Replicas.alone(
        module, torch.optim.SGD(net.parameters(), lr=0.0), torch.Generator().manual_seed(0),
        **module.step_settings(),
    )  # fmt: skip

    def split(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = StructMNISTDataModule("unused").split_context(bits)
        return batch.x, batch.context

    replicas.step(images, split, lambda loss: loss.backward())  # the training step, lr 0
    for group in (net.prior, net.encoder, net.decoder):
        grads = [p.grad for p in group.parameters()]
        assert all(g is not None and g.isfinite().all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
