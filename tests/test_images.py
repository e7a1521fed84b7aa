"""Pictures at every validation: sample and reconstruction grids on disk, in W&B and
TensorBoard, for MNIST and struct-MNIST, without changing training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dreg.callbacks.images import BORDER, FRAME, SampleAndReconstructionImages
from dreg.checkpointing import load_checkpoint
from dreg.model import VAE
from dreg.run import train
from tests.conftest import ROOT, TINY_RUN, compose_config, requires_mnist

SIDE = 28
STEP = SIDE + BORDER
SAMPLES_SHAPE = (8 * STEP + BORDER, 8 * STEP + BORDER)  # 64 samples, 8 a row
RECONSTRUCTIONS_SHAPE = (2 * STEP + BORDER, 8 * STEP + BORDER)  # 8 images over 8 decodings
VALIDATION_STEPS = (2, 4)  # TINY_RUN validates every 2 of its 4 steps


def read_grey(path: Path) -> np.ndarray:
    """A PNG written by the callback as ``[H, W]`` grey levels in [0, 1]."""
    rgba = matplotlib.image.imread(path)
    assert rgba.ndim == 3 and rgba.shape[-1] == 4, rgba.shape
    assert np.array_equal(rgba[..., 0], rgba[..., 1]) and np.array_equal(rgba[..., 0], rgba[..., 2])
    assert (rgba[..., 3] == 1).all()  # opaque
    return rgba[..., 0]


def tiles(grid: np.ndarray) -> np.ndarray:
    """``[rows, columns, SIDE, SIDE]`` images of a grid (frames dropped)."""
    rows, columns = (grid.shape[0] - BORDER) // STEP, (grid.shape[1] - BORDER) // STEP
    out = np.empty((rows, columns, SIDE, SIDE), dtype=grid.dtype)
    for r in range(rows):
        for c in range(columns):
            top, left = BORDER + r * STEP, BORDER + c * STEP
            out[r, c] = grid[top : top + SIDE, left : left + SIDE]
    return out


def check_grids(images_dir: Path) -> dict[str, np.ndarray]:
    """Assert the PNGs of every validation exist with the grid sizes; return the last ones."""
    expected = [
        f"{name}-step{step:06d}.png"
        for name in ("reconstructions", "samples")
        for step in VALIDATION_STEPS
    ]
    assert sorted(p.name for p in images_dir.iterdir()) == expected  # no temporaries left
    last = VALIDATION_STEPS[-1]
    samples = read_grey(images_dir / f"samples-step{last:06d}.png")
    reconstructions = read_grey(images_dir / f"reconstructions-step{last:06d}.png")
    assert samples.shape == SAMPLES_SHAPE and reconstructions.shape == RECONSTRUCTIONS_SHAPE
    for grid in (samples, reconstructions):
        assert 0 <= grid.min() and grid.max() <= 1
        assert abs(grid[0, 0] - FRAME) < 1 / 255  # the frame is mid grey
    return {"samples": samples, "reconstructions": reconstructions}


# -- fast: the callback on its own ----------------------------------------------------------
def test_samples_are_the_same_every_time_and_leave_the_global_rng_alone():
    net = VAE(data_dim=SIDE * SIDE, latent_dim=4, hidden_dims=[16])
    callback = SampleAndReconstructionImages(dirpath="unused", num_samples=16, columns=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = callback.samples(net, None), callback.samples(net, None)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second) and first.shape == (16, SIDE, SIDE)
    assert first.std(0).max() > 0  # different latent points give different pictures


@pytest.mark.parametrize(
    ("key", "value"), [("num_samples", -1), ("num_reconstructions", -8), ("columns", 0)]
)
def test_bad_grid_size_names_the_key_and_a_fix(key, value):
    with pytest.raises(ValueError, match=rf"^callbacks\.images\.{key}={value}: .*set e\.g\."):
        SampleAndReconstructionImages(dirpath="unused", **{key: value})


# -- real training --------------------------------------------------------------------------
@requires_mnist
@pytest.mark.slow
def test_tiny_cli_run_goes_offline_writes_pngs_and_sends_the_same_pictures_to_wandb(tmp_path):
    """One tiny run with the W&B logger and no credentials: it runs offline, never prompts
    (no stdin), logs its metrics to the offline run and sends it the pictures of its PNGs.
    (The offline checks were tests/test_cli.py's own run of the same command.)"""
    home = tmp_path / "home"  # no ~/.netrc, no API key: must go offline, never prompt
    home.mkdir()
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_RUN if not o.startswith("logger=")]
    result = subprocess.run(
        [sys.executable, "train.py", "logger=wandb", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "",
             "WANDB_DIR": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(run_dir.iterdir())
    (record_file,) = runs[0].glob("*.wandb")  # what `wandb sync` uploads
    records = record_file.read_bytes()
    # History values are stored as JSON text after the key (protobuf field 16, length-prefixed).
    logged = [float(v) for v in re.findall(rb"test/log_likelihood\x82\x01.(-?[0-9.e+-]+)", records)]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/log_likelihood"] in logged
    assert b"train/objective" in records
    assert "wandb sync" in result.stdout + result.stderr

    grids = check_grids(run_dir / "images")
    reconstructions = tiles(grids["reconstructions"])
    originals, decoded = reconstructions[0], reconstructions[1]
    assert set(np.unique(originals)) <= {0.0, 1.0}  # binarized validation images
    assert len(np.unique(decoded)) > 2  # Bernoulli means, not bits
    # Reconstructions look like their images: closer to their own than to another one.
    own = np.abs(decoded - originals).mean()
    shifted = np.abs(decoded - np.roll(originals, 1, axis=0)).mean()
    assert own < shifted, (own, shifted)

    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    media = wandb_run / "files" / "media" / "images" / "images"
    for name, grid in grids.items():
        logged = sorted(media.glob(f"{name}_*.png"))
        assert len(logged) == len(VALIDATION_STEPS), sorted(media.iterdir())
        last = matplotlib.image.imread(max(logged, key=lambda p: int(p.name.split("_")[1])))
        assert np.array_equal(last, grid)  # the very pixels of the PNG


def final_weights_and_metrics(output_dir: Path, *overrides: str) -> tuple[dict, dict]:
    metrics = train(compose_config([*TINY_RUN, *overrides], output_dir))
    weights = load_checkpoint(output_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return weights, metrics


@requires_mnist
@pytest.mark.slow
def test_training_is_bitwise_identical_with_and_without_the_pictures(tmp_path):
    # TINY_RUN validates (and draws the pictures) at step 2, then trains steps 3 and 4.
    with_weights, with_metrics = final_weights_and_metrics(tmp_path / "with")
    assert (tmp_path / "with" / "images" / "samples-step000002.png").exists()
    without_weights, without_metrics = final_weights_and_metrics(
        tmp_path / "without", "~callbacks.images"
    )
    assert not (tmp_path / "without" / "images").exists()
    for name, tensor in without_weights.items():
        assert torch.equal(with_weights[name], tensor), name
    for key in ("train/objective", "val/log_likelihood", "test/log_likelihood", "test/bound"):
        assert with_metrics[key] == without_metrics[key], key


@requires_mnist
@pytest.mark.slow
def test_struct_mnist_samples_complete_the_top_half_of_data_images(tmp_path):
    train(compose_config([*TINY_RUN, "dataset=struct_mnist", "logger=tensorboard"], tmp_path))
    samples = tiles(check_grids(tmp_path / "images")["samples"])  # [8 rows, 8 columns, 28, 28]
    top, bottom = samples[..., : SIDE // 2, :], samples[..., SIDE // 2 :, :]
    assert set(np.unique(top)) <= {0.0, 1.0}  # the context: binarized data
    assert (top == top[:, :1]).all()  # one context a row
    assert not (top[0] == top[1]).all()  # rows use different validation images
    assert (bottom.std(axis=1) > 0).any()  # the model's bottom halves vary along a row

    # Lightning opens one event file for fit and one for test; the pictures are in fit's.
    logged_images = {}
    for events in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            logged_images.setdefault(tag, []).extend(accumulator.Images(tag))
    for name, shape in (("samples", SAMPLES_SHAPE), ("reconstructions", RECONSTRUCTIONS_SHAPE)):
        logged = logged_images[f"images/{name}"]
        assert [e.step for e in logged] == list(VALIDATION_STEPS)
        assert (logged[-1].height, logged[-1].width) == shape
