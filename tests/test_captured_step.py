"""model.cuda_graph: the captured training step (CUDA only; skipped without a GPU).

:class:`dreg.captured_step.CapturedStep` records :meth:`dreg.step.Replicas.step` (a run
alone, M = 1, or a pack's cohort of M replicas) as one CUDA graph. Layers: replay against the
same step taken eagerly (alone and stacked), fresh noise at every replay, the non-finite
flags inside a run, then the real entry points (a run alone through ``dreg.run.train``, a
packed sweep through the command line).

Tolerance of the replay-versus-eager comparison: float32, ``atol=1e-5, rtol=1e-4`` after 100
steps. The graph replays the very kernels of the eager step with the same Philox offsets, so
the two are expected to agree to the bit; the tolerance allows for cuBLAS choosing another
GEMM algorithm or split-K reduction order under stream capture (a last-bit difference per
step, which 100 Adam steps of size lr = 3e-4 keep far below 1e-5 in the parameters). The
stacked comparison (M = 3, 20 steps, the last 15 replayed) uses the same tolerance for the
same reason.

The whole runs (Lightning, command line) compare ``model.cuda_graph=true`` with ``false``:
the eager run's Adam is the plain one, the graph's is ``capturable=True`` (step count and
bias correction on the device, the same formulas in another order), so their records agree
to float round-off, checked at ``rel=1e-3``.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor

from dreg.captured_step import CapturedStep
from dreg.estimators import estimator_by_name
from dreg.lightning_module import DReGModule
from dreg.model import VAE
from dreg.run import train
from dreg.step import Replicas
from tests.conftest import TINY_RUN, cli, compose_config, requires_mnist
from tests.test_pack import ESTIMATORS, PACKED, SHORT, SWEEP, assert_close_records, summary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
BATCH, K, ROWS = 32, 64, 1000
GPU = ["trainer.accelerator=gpu"]


# -- building a step as a run alone (M = 1) or a pack's cohort (M > 1) builds it --------------
def grey_levels() -> Tensor:
    """``[ROWS, 784]`` random grey levels on the device: a training split's stand-in."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(ROWS, 784, generator=generator).to(DEVICE)


def module_for(
    estimator: str, data: Tensor, seed: int = 0, lr: float = 3e-4, nonfinite: str = "raise"
) -> DReGModule:
    """A module on the device whose optimizer is Adam with ``capturable=True`` (what
    ``DReGModule.make_optimizer`` builds under ``model.cuda_graph=true``)."""
    torch.manual_seed(seed)
    net = VAE(784, train_mean=data.mean(0).cpu())
    optimizer = partial(torch.optim.Adam, lr=lr, capturable=True)
    module = DReGModule(
        net, estimator_by_name(estimator), optimizer, num_samples=K, nonfinite=nonfinite
    )
    return module.to(DEVICE)


def noise(seed: int) -> torch.Generator:
    """A job's training-noise generator, on the device."""
    return torch.Generator(DEVICE).manual_seed(seed)


def alone(module: DReGModule, noise_seed: int = 7) -> Replicas:
    """The step of a run alone, as ``DReGModule.replicas`` builds it."""
    return Replicas.alone(
        module, module.configure_optimizers(), noise(noise_seed), **module.step_settings()
    )


def stacked(modules: list[DReGModule], noise_seeds: list[int]) -> Replicas:
    """The step of a pack's cohort, as ``Pack._cohorts_of`` builds it."""
    return Replicas.stacked(
        modules,
        [m.configure_optimizers() for m in modules],
        [noise(s) for s in noise_seeds],
        **modules[0].step_settings(),
    )


def split(bits: Tensor) -> tuple[Tensor, Tensor | None]:
    """MNIST's split: every pixel is x, no context."""
    return bits, None


def captured(replicas: Replicas, data: Tensor) -> CapturedStep:
    return CapturedStep(replicas, data, split, BATCH)


def rows_for(steps: int, size: int = 1) -> Tensor:
    """``[steps, M, B]`` row indices: each step's batch of each replica."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, ROWS, (steps, size, BATCH), generator=generator).to(DEVICE)


def parameters_of(replicas: Replicas, m: int) -> dict[str, Tensor]:
    """Replica ``m``'s parameters now (a copy)."""
    return {name: p[m].detach().clone() for name, p in replicas.params.items()}


def assert_same_parameters(got: DReGModule, want: DReGModule) -> None:
    for (name, w), g in zip(want.net.named_parameters(), got.net.parameters(), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)


# -- replay against eager ---------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["iwae", "dreg_iwae", "dreg_jvi"])
def test_replay_matches_eager_for_100_steps(estimator):
    data, rows = grey_levels(), rows_for(100)
    eager_module, graph_module = module_for(estimator, data), module_for(estimator, data)
    eager_replicas, graph_replicas = alone(eager_module), alone(graph_module)

    eager = captured(eager_replicas, data)
    eager_replicas.start_run()
    for r in rows:
        eager.eager_step(r)
    graph = captured(graph_replicas, data)
    graph.capture()  # restores parameters, Adam state and noise generator after its warm-up
    graph_replicas.start_run()
    for r in rows:
        graph.replay(r)
    torch.cuda.synchronize()

    assert_same_parameters(graph_module, eager_module)
    torch.testing.assert_close(
        graph_replicas.objective, eager_replicas.objective, atol=1e-5, rtol=1e-4
    )
    # The registered generator advanced by the graph's total at every replay: as 100 eager steps.
    generators = [r.specs[0].generator for r in (graph_replicas, eager_replicas)]
    assert torch.equal(generators[0].get_state(), generators[1].get_state())
    assert graph_replicas.faults() == eager_replicas.faults() == ([-1], [0])


def test_a_captured_pack_of_three_matches_its_eager_steps():
    """A pack's cohort (M = 3, stacked parameters, the model under vmap) captured as one graph
    after 5 eager steps (an optimizer with state, as after a resume or a restacked cohort): 15
    replays against the same stacked step taken eagerly 20 times; each job's parameters and
    Adam state written back by ``store``."""
    estimators, seeds, noise_seeds = ["iwae", "dreg_iwae", "dreg_iwae"], [0, 1, 2], [10, 11, 12]
    data, rows = grey_levels(), rows_for(20, size=3)

    def cohort() -> tuple[list[DReGModule], Replicas]:
        modules = [module_for(e, data, s) for e, s in zip(estimators, seeds, strict=True)]
        return modules, stacked(modules, noise_seeds)

    (eager_modules, eager_replicas), (graph_modules, graph_replicas) = cohort(), cohort()
    assert graph_replicas.size == 3 and len(graph_replicas.groups) == 2  # iwae | dreg_iwae x2
    eager = captured(eager_replicas, data)
    eager_replicas.start_run()
    for r in rows:
        eager.eager_step(r)
    graph = captured(graph_replicas, data)
    graph_replicas.start_run()
    for r in rows[:5]:
        graph.eager_step(r)
    for r in rows[5:]:
        graph.replay(r)  # the first replay captures (and resets the run's flags)
    torch.cuda.synchronize()

    optimizers = {}
    for name, replicas, modules in (
        ("eager", eager_replicas, eager_modules),
        ("graph", graph_replicas, graph_modules),
    ):
        optimizers[name] = [m.configure_optimizers() for m in modules]
        replicas.store(modules, optimizers[name])
    for m, (got, want) in enumerate(zip(graph_modules, eager_modules, strict=True)):
        assert_same_parameters(got, want)
        for p, q in zip(got.net.parameters(), want.net.parameters(), strict=True):
            got_state, want_state = optimizers["graph"][m].state[p], optimizers["eager"][m].state[q]
            assert float(got_state["step"]) == float(want_state["step"]) == 20
            torch.testing.assert_close(
                got_state["exp_avg_sq"], want_state["exp_avg_sq"], atol=1e-5, rtol=1e-4
            )
    torch.testing.assert_close(
        graph_replicas.objective, eager_replicas.objective, atol=1e-5, rtol=1e-4
    )
    for got, want in zip(graph_replicas.specs, eager_replicas.specs, strict=True):
        assert torch.equal(got.generator.get_state(), want.generator.get_state())
    assert graph_replicas.faults() == eager_replicas.faults() == ([-1] * 3, [0] * 3)


# -- random numbers -------------------------------------------------------------------------
def test_a_registered_generator_draws_fresh_numbers_at_every_replay():
    """What the captured step relies on: a graph that draws from a registered generator reads
    its current offset at every replay, so replays give the numbers eager draws would."""
    generator = noise(3)
    start = generator.get_state()
    out = torch.empty(8, device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        out.copy_(torch.randn(8, device=DEVICE, generator=generator))
    generator.set_state(start)
    draws = []
    for _ in range(20):
        graph.replay()
        draws.append(out.clone())
    assert len({tuple(d.tolist()) for d in draws}) == 20
    reference = noise(3)
    for draw in draws:
        assert torch.equal(draw, torch.randn(8, device=DEVICE, generator=reference))


def test_every_replay_draws_fresh_noise():
    # lr = 0 keeps the model fixed and the batch is the same, so only the noise (binarization
    # and eps) can change the objective and the gradient from one replay to the next.
    data = grey_levels()
    module = module_for("dreg_iwae", data, lr=0.0)
    replicas = alone(module)
    step = captured(replicas, data)
    start = parameters_of(replicas, 0)
    row = rows_for(1)[0]
    objectives, gradients = [], []
    for _ in range(20):
        step.replay(row)
        objectives.append(replicas.objective.item())
        gradients.append(torch.cat([p.grad.flatten() for p in module.net.parameters()]))
    assert len(set(objectives)) == 20
    assert not torch.equal(gradients[0], gradients[1])
    for name, p in parameters_of(replicas, 0).items():
        assert torch.equal(p, start[name]), name


# -- non-finite steps -----------------------------------------------------------------------
def poison_input(replicas: Replicas, m: int, on: bool, saved: list[float]) -> None:
    """NaN in replica ``m``'s encoder input centring (a buffer the graph reads by address:
    the module's own alone, the stacked copy in a cohort)."""
    train_mean = replicas.buffers["train_mean"]
    if on:
        saved.append(float(train_mean[m, 0]))
        train_mean[m, 0] = float("nan")
    elif saved:
        train_mean[m, 0] = saved.pop()


@pytest.mark.parametrize("size", [1, 3], ids=["alone", "pack"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_step_inside_a_run_is_flagged(policy, size):
    """Step 3 of a run of 6 goes non-finite for one replica: its update is undone in the graph
    and the flags name step 3; under skip it counts one skipped step and trains on, under raise
    it stops updating (the job fails when the host reads the flags). Other replicas train on."""
    data = grey_levels()
    modules = [module_for("dreg_iwae", data, seed, nonfinite=policy) for seed in range(size)]
    replicas = alone(modules[0]) if size == 1 else stacked(modules, list(range(size)))
    bad = size // 2  # 0 alone, the middle replica of three
    step = captured(replicas, data)
    replicas.start_run()
    saved: list[float] = []
    snapshots = []
    for i, r in enumerate(rows_for(6, size)):
        poison_input(replicas, bad, on=i == 3, saved=saved)
        step.replay(r)
        poison_input(replicas, bad, on=False, saved=saved)
        snapshots.append([parameters_of(replicas, m) for m in range(size)])
    first_bad, skipped = replicas.faults()
    assert first_bad == [3 if m == bad else -1 for m in range(size)]
    assert skipped == [int(m == bad and policy == "skip") for m in range(size)]
    final = [parameters_of(replicas, m) for m in range(size)]
    assert all(torch.isfinite(p).all() for params in final for p in params.values())
    name = "encoder.net.0.weight"
    # The bad step's update is undone in place, to the bit.
    for key, value in snapshots[3][bad].items():
        assert torch.equal(value, snapshots[2][bad][key]), key
    if policy == "skip":
        assert not torch.equal(final[bad][name], snapshots[3][bad][name])  # steps 4, 5 trained
    else:
        for key, value in final[bad].items():  # stopped at its last good values
            assert torch.equal(value, snapshots[3][bad][key]), key
    for m in range(size):
        if m != bad:
            assert not torch.equal(snapshots[3][m][name], snapshots[2][m][name])
            assert not torch.equal(final[m][name], snapshots[3][m][name])


# -- the real entry points ------------------------------------------------------------------
def metrics_close(got: dict, want: dict, rel: float) -> None:
    for key in ("val/log_likelihood", "val/bound", "test/log_likelihood", "train/objective"):
        assert math.isclose(got[key], want[key], rel_tol=rel, abs_tol=rel), (key, got, want)


@requires_mnist
def test_lightning_run_with_a_captured_grouped_step(tmp_path, monkeypatch):
    captures = []
    capture = CapturedStep.capture

    def counted(self: CapturedStep) -> None:
        captures.append(self.replicas.size)
        capture(self)

    monkeypatch.setattr(CapturedStep, "capture", counted)
    overrides = [
        *TINY_RUN,
        *GPU,
        "trainer.max_steps=21",
        "trainer.val_check_interval=5",
        "trainer.log_every_n_steps=3",
        "model.steps_per_call=4",
    ]
    runs = {}
    for graph in ("true", "false"):
        cfg = compose_config([*overrides, f"model.cuda_graph={graph}"], Path(tmp_path / graph))
        runs[graph] = train(cfg)
        assert runs[graph]["global_step"] == 21
        assert math.isfinite(runs[graph]["val/log_likelihood"])
    assert captures == [1]  # captured once, by the run with model.cuda_graph=true
    metrics_close(runs["true"], runs["false"], rel=1e-3)


@requires_mnist
@pytest.mark.slow
def test_a_packed_sweep_with_a_captured_joint_step_records_what_eager_records(tmp_path):
    """Three jobs, one pack, one cohort (dreg_cv's control variate included): the joint step
    captured (``model.cuda_graph=true``) against the same packed sweep stepped eagerly."""
    sweeps = {}
    for graph in ("true", "false"):
        sweep = sweeps[graph] = tmp_path / f"graph-{graph}"
        result = cli("-m", *SWEEP, *SHORT, ESTIMATORS, PACKED, *GPU,
                     f"model.cuda_graph={graph}", f"hydra.sweep.dir={sweep}")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert [r["status"] for r in summary(sweep).values()] == ["completed"] * 3
    for job in ("0", "1", "2"):
        metrics = json.loads((sweeps["true"] / job / "metrics.json").read_text())
        assert metrics["pack_size"] == 3 and metrics["global_step"] == 6
        assert_close_records(sweeps["true"] / job, sweeps["false"] / job, rel=1e-3)
