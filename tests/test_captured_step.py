"""model.cuda_graph: the captured training step (CUDA only; skipped without a GPU).

Tolerance of the replay-versus-eager comparison: float32, ``atol=1e-5, rtol=1e-4`` after 100
steps. The graph replays the very kernels of the eager step with the same Philox offsets, so
the two are expected to agree to the bit; the tolerance allows for cuBLAS choosing another
GEMM algorithm or split-K reduction order under stream capture (a last-bit difference per
step, which 100 Adam steps of size lr = 3e-4 keep far below 1e-5 in the parameters).
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch

from dreg.captured_step import CapturedStep
from dreg.datamodules.binarized import Batch
from dreg.estimators import estimator_by_name
from dreg.lightning_module import DReGModule
from dreg.model import VAE
from dreg.run import train
from tests.conftest import TINY_RUN, compose_config, requires_mnist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, K = 32, 64


def make(estimator: str = "dreg_iwae", lr: float = 3e-4, skip: bool = False):
    """A module on the GPU, its capturable Adam, a captured step, and random grey levels."""
    torch.manual_seed(0)
    data = torch.rand(1000, 784, device="cuda")
    net = VAE(784, train_mean=data.mean(0).cpu())
    module = DReGModule(
        net, estimator_by_name(estimator)(), partial(torch.optim.Adam, lr=lr), num_samples=K
    ).cuda()
    optimizer = torch.optim.Adam(module.net.parameters(), lr=lr, capturable=True)
    step = CapturedStep(module, optimizer, data, lambda x: Batch(x=x), BATCH, skip_nonfinite=skip)
    return module, optimizer, step, data


def rows_for(steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 1000, (steps, BATCH), generator=generator).cuda()


@pytest.mark.parametrize("estimator", ["iwae", "dreg_iwae", "dreg_jvi"])
def test_replay_matches_eager_for_100_steps(estimator):
    rows = rows_for(100)
    eager_module, _, eager, _ = make(estimator)
    graph_module, _, graph, _ = make(estimator)
    graph_module.load_state_dict(copy.deepcopy(eager_module.state_dict()))

    torch.cuda.manual_seed(7)
    for r in rows:
        eager.eager_step(r)
    torch.cuda.manual_seed(7)
    graph.capture()  # restores the RNG state it found, after its warm-up
    graph.start_group()
    for r in rows:
        graph.replay(r)
    torch.cuda.synchronize()
    for (name, want), got in zip(
        eager_module.net.state_dict().items(), graph_module.net.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
    assert graph.faults() == (-1, 0)


def test_every_replay_draws_fresh_noise():
    # The generator itself: a captured randn gives new numbers on every replay.
    out = torch.empty(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(torch.randn(8, device="cuda"))
    draws = []
    for _ in range(20):
        graph.replay()
        draws.append(out.clone())
    assert len({tuple(d.tolist()) for d in draws}) == 20

    # The step: lr = 0 keeps the model fixed and the batch is the same, so only the noise
    # (eps and binarization) can change the objective from one replay to the next.
    _, _, step, _ = make(lr=0.0)
    row = rows_for(1)[0]
    objectives = []
    for _ in range(20):
        step.replay(row)
        objectives.append(step.objective.item())
    assert len(set(objectives)) == 20


def poison_input(module: DReGModule, on: bool) -> None:
    """NaN in the encoder's input centring (a buffer the graph reads by address)."""
    module.net.train_mean[0] = float("nan") if on else 0.5


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_step_inside_a_group_is_flagged(policy):
    module, _, step, _ = make(skip=policy == "skip")
    rows = rows_for(6)
    step.capture()
    step.start_group()
    for i, r in enumerate(rows):
        poison_input(module, on=i == 3)
        step.replay(r)
        if i == 3:
            before = {k: v.clone() for k, v in module.net.state_dict().items()}
    poison_input(module, on=False)
    first_bad, skipped = step.faults()
    assert first_bad == 3
    params = dict(module.net.named_parameters())
    if policy == "skip":
        assert skipped == 1
        assert all(torch.isfinite(p).all() for p in params.values())
        assert not torch.equal(params["encoder.net.0.weight"], before["encoder.net.0.weight"])
    else:
        assert skipped == 0  # raise: the module raises on the flag, naming step 3 of the group


@requires_mnist
def test_lightning_run_with_a_captured_grouped_step(tmp_path):
    overrides = [
        *TINY_RUN,
        "trainer.accelerator=gpu",
        "trainer.max_steps=21",
        "trainer.val_check_interval=5",
        "trainer.log_every_n_steps=3",
        "model.cuda_graph=true",
        "model.steps_per_call=4",
    ]
    metrics = train(compose_config(overrides, Path(tmp_path)))
    assert metrics["global_step"] == 21
    assert torch.isfinite(torch.tensor(metrics["val/log_likelihood"]))
