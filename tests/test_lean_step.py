"""The lean training step (issue 25): what it leaves out changes no number.

* Estimators whose score coefficients are zero by construction (``uses_score = False``) build
  no log q(stop z) graph, and their routed gradient is the reference one.
* On the CPU a step whose replicas are all finite skips the per-replica flags and the masked
  copy (:meth:`dreg.step.Replicas._all_fine_on_host`): parameters, optimizer state and flags
  are bitwise those of the device path, with good and bad steps.
* The operator count of a DReG-IWAE step stays within 1.15x a plain hand-written step.
* A run alone backs up with ``Tensor.backward`` unless DDP or a backward hook needs
  Lightning's ``manual_backward``; both give the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from benchmarks.op_count import PlainStep, _split, count, ours, tiny_net
from dreg.build import build, build_trainer
from dreg.estimators import Particles, estimator_classes, routed_loss, surrogate_losses
from dreg.estimators.ops import iwae_bound
from dreg.grouped_step import needs_lightning_backward
from dreg.hierarchical import TwoLayerVAE
from dreg.step import Replicas
from tests.conftest import TINY_RUN, compose_config, requires_mnist

LEAN = sorted(name for name, cls in estimator_classes().items() if not cls.uses_score)


def test_the_dreg_estimators_and_stl_are_the_lean_ones():
    assert {"stl", "dreg_iwae", "dreg_rws", "dreg_jvi", "dreg_alpha"} <= set(LEAN)
    assert not {"iwae", "rws", "jvi", "vae", "dreg_cv"} & set(LEAN)


@pytest.mark.parametrize("name", LEAN)
def test_an_estimator_without_score_term_has_zero_score_coefficients(name):
    log_w = torch.randn(8, 5, dtype=torch.float64) * 3
    estimator = estimator_classes()[name]()
    assert torch.equal(estimator(log_w).score, torch.zeros_like(log_w))


@pytest.mark.parametrize(
    "name", sorted(n for n, c in estimator_classes().items() if c.objective_is_iwae_bound)
)
def test_an_objective_recorded_as_the_iwae_bound_is_the_iwae_bound(name):
    log_w = torch.randn(8, 5, dtype=torch.float64) * 3
    objective = estimator_classes()[name]()(log_w).objective
    torch.testing.assert_close(objective, iwae_bound(log_w))


def _two_layer() -> TwoLayerVAE:
    torch.manual_seed(0)
    return TwoLayerVAE(784, latent_dims=(3, 2), hidden_dims=((8,), (5,)))


@pytest.mark.parametrize(
    ("name", "make_net"),
    [("dreg_iwae", tiny_net), ("stl", tiny_net), ("dreg_rws", tiny_net),
     ("dreg_iwae", _two_layer), ("dreg_rws", _two_layer)],
)  # fmt: skip
def test_the_routed_gradient_without_score_graph_is_the_reference_gradient(name, make_net):
    net = make_net().double()
    x = torch.bernoulli(torch.rand(6, 784, dtype=torch.float64))
    eps = torch.randn(4, 6, net.noise_dim, dtype=torch.float64)
    estimator = estimator_classes()[name]()
    z, log_q_stopped, none = net.propose(x, None, eps, False)
    assert none is None
    z_for_p = z.view_as(z)
    lean = Particles(net.log_joint(x, z_for_p), log_q_stopped, None, z_for_p)
    routed_loss(lean, estimator(lean.log_w)).backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    z, log_q_stopped, log_q_stop_z = net.propose(x, None, eps)
    full = Particles(net.log_joint(x, z), log_q_stopped, log_q_stop_z, z)
    model_loss, inference_loss = surrogate_losses(full, estimator(full.log_w))
    decoder = set(map(id, net.model_parameters()))
    for p, g in zip(net.parameters(), got, strict=True):
        loss = model_loss if id(p) in decoder else inference_loss
        (want,) = torch.autograd.grad(loss, p, retain_graph=True)
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def _state(replicas: Replicas) -> list[Tensor]:
    out = [p.detach().clone() for p in replicas.leaves]
    for p in replicas.leaves:
        out += [v.clone() for v in replicas.optimizer.state[p].values()]
    flags = (replicas.first_bad, replicas.skipped, replicas.alive, replicas.step_in_run)
    return out + [f.clone() for f in flags] + [replicas.objective.clone()]


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("name", ["dreg_iwae", "iwae"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_host_fast_path_gives_the_device_path_numbers(name, nonfinite, clip, monkeypatch):
    images = torch.rand(1, 32, 784, generator=torch.Generator().manual_seed(2))
    runs = []
    for fast in (True, False):
        replicas = ours(tiny_net(), name, 4, nonfinite=nonfinite, clip_grad_norm=clip)
        if not fast:
            monkeypatch.setattr(replicas, "_all_fine_on_host", lambda loss, sq_norm: False)
        bias = replicas.net.decoder[0].bias
        # Step 2's gradient is infinite in one entry: skipped (or, under raise, frozen).
        bias.register_hook(lambda g, r=replicas: g.index_fill(0, torch.tensor([0]), torch.inf)
                           if int(r.step_in_run) == 2 else g)  # fmt: skip
        replicas.start_run()
        states = []
        for _ in range(5):
            replicas.step(images, _split, Tensor.backward)
            states.append(_state(replicas))
        runs.append(states)
        assert replicas.faults() == ([2], [1 if nonfinite == "skip" else 0])
    for fast, device in zip(*runs, strict=True):
        for a, b in zip(fast, device, strict=True):
            assert torch.equal(a, b)


def test_a_dreg_iwae_step_has_at_most_115_percent_of_a_plain_steps_operators():
    images = torch.rand(1, 32, 784, generator=torch.Generator().manual_seed(2))
    replicas, plain = ours(tiny_net(), "dreg_iwae", 4), PlainStep(tiny_net(), "dreg_iwae", 4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        replicas.step(images, _split, Tensor.backward)
        plain.step(images[0], generator)
    mine = count(lambda: replicas.step(images, _split, Tensor.backward))["profiler"]
    theirs = count(lambda: plain.step(images[0], generator))["profiler"]
    assert mine <= 1.15 * theirs, (mine, theirs)


# -- the backward of a run alone ------------------------------------------------------------------
class BackwardHooks(pl.Callback):
    """Lightning's backward hooks, which only ``manual_backward`` calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_before_backward(self, trainer, module, loss) -> None:
        self.calls.append("before")

    def on_after_backward(self, trainer, module) -> None:
        self.calls.append("after")


def _fit(out: Path, *callbacks: pl.Callback) -> tuple[pl.Trainer, list[Tensor]]:
    cfg = compose_config([*TINY_RUN, "trainer.max_steps=6", "model.steps_per_call=4"], out)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, module = build(cfg)
    trainer = build_trainer(cfg, out)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=datamodule)
    return trainer, [p.detach().clone() for p in module.parameters()]


@requires_mnist
def test_a_run_alone_backs_up_through_lightning_only_where_a_hook_needs_it(tmp_path):
    # Tensor.backward by default (Lightning's hook dispatch is a tenth of a tiny step); a
    # callback with a backward hook gets manual_backward and its every call, same numbers.
    lean, lean_params = _fit(tmp_path / "lean")
    assert not needs_lightning_backward(lean)
    assert all(g["fused"] for g in lean.optimizers[0].param_groups)  # the config's Adam
    hooks = BackwardHooks()
    hooked, hooked_params = _fit(tmp_path / "hooked", hooks)
    assert needs_lightning_backward(hooked)
    assert hooks.calls == ["before", "after"] * 6
    for got, want in zip(hooked_params, lean_params, strict=True):
        assert torch.equal(got, want)
