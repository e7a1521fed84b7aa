"""The compiled paths (``model.compile=mlps`` and ``step``) give the eager path's numbers."""

from __future__ import annotations

import shutil

import pytest
import torch

from dreg.estimators import routed_loss
from dreg.estimators.iwae import DReGIWAE
from dreg.lightning_module import DReGModule
from dreg.model import VAE
from tests.conftest import requires_mnist


def module(compile_: bool | str) -> DReGModule:
    torch.manual_seed(0)
    net = VAE(784, train_mean=torch.rand(784) * 0.3)
    return DReGModule(net, DReGIWAE(), torch.optim.Adam, num_samples=16, compile=compile_)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C compiler",
)
def test_compiled_step_matches_eager():
    eager, compiled = module(False), module("mlps")
    assert list(eager.state_dict()) == list(compiled.state_dict())  # checkpoints interchange
    x = torch.bernoulli(torch.rand(8, 784) * 0.3)
    grads = []
    for m in (eager, compiled):
        torch.manual_seed(1)
        particles = m.net.particles(x, 16)
        weights = m.estimator(particles.log_w)
        routed_loss(particles, weights).backward()
        grads.append([p.grad for p in m.net.parameters()])
        assert torch.isfinite(weights.objective).all()
    for got, want in zip(grads[1], grads[0], strict=True):
        # Inductor fuses and reorders float32 reductions: equal up to rounding, not bitwise.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def assert_close_up_to_adam_sign_flips(got, want, lr: float, steps: int) -> None:
    """Parameters equal to float32 round-off, except where Adam amplified it: a coordinate
    whose gradient is about zero moves by about ``lr`` per step whatever the sign of its
    round-off, so a rare coordinate (at most one in a thousand here) may differ by up to
    ``2 lr`` per step, and none by more."""
    far, total = 0, 0
    for b, a in zip(got, want, strict=True):
        off = ~torch.isclose(b, a, rtol=1e-5, atol=1e-6)
        far, total = far + int(off.sum()), total + a.numel()
        gap = (b - a).abs()[off]
        assert (gap <= 2 * lr * steps).all(), f"{gap.max():.3g} beyond Adam's 2 lr per step"
    assert far <= total // 1000, f"{far} of {total} parameters beyond float32 round-off"


def _stacked(name: str, size: int = 2):
    """A pack's stacked step over ``size`` tiny jobs (as dreg.pack builds it)."""
    import functools

    from benchmarks.op_count import tiny_net
    from dreg.estimators import estimator_by_name
    from dreg.step import Replicas

    modules = [
        DReGModule(tiny_net(seed=i), estimator_by_name(name),
                   functools.partial(torch.optim.Adam, lr=3e-4), num_samples=4)
        for i in range(size)
    ]  # fmt: skip
    optimizers = [m.configure_optimizers() for m in modules]
    generators = [torch.Generator().manual_seed(10 + i) for i in range(size)]
    return Replicas.stacked(modules, optimizers, generators, **modules[0].step_settings())


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C compiler",
)
@pytest.mark.parametrize(("layout", "name"), [("alone", "dreg_iwae"), ("stacked", "rws")])
def test_the_compiled_step_is_the_eager_step_without_graph_breaks(layout, name):
    """``model.compile=step`` (``Replicas.compiled``): each compiled region is one graph, and
    parameters, optimizer state, flags and records follow eager to float32 round-off, a
    skipped non-finite step included."""
    from torch import Tensor

    from benchmarks.op_count import _split, ours, tiny_net

    def build():
        if layout == "alone":  # with the config's fused Adam (the stacked case: single-tensor)
            return ours(tiny_net(), name, 4, fused=True, nonfinite="skip")
        replicas = _stacked(name)
        replicas.skip.fill_(True)
        return replicas

    eager, compiled = build(), build().compiled()
    size = eager.size
    images = torch.rand(size, 32, 784, generator=torch.Generator().manual_seed(2))
    for replicas in (eager, compiled):
        # Step 2's gradient is infinite in one entry of the last replica's decoder bias.
        leaf = next(p for n, p in replicas.params.items() if n == "decoder.2.bias")
        if replicas.direct:
            leaf = replicas.net.decoder[2].bias
        mask = torch.zeros_like(leaf, dtype=torch.bool).reshape(size if not replicas.direct
                                                                else 1, -1)  # fmt: skip
        mask[-1, 0] = True
        mask = mask.reshape(leaf.shape)
        leaf.register_hook(lambda g, r=replicas, mask=mask: g.masked_fill(mask, torch.inf)
                           if int(r.step_in_run) == 2 else g)  # fmt: skip
        replicas.start_run()
        for _ in range(4):
            replicas.step(images, _split, Tensor.backward)
    assert eager.faults() == compiled.faults() == ([-1] * (size - 1) + [2], [0] * (size - 1) + [1])
    assert_close_up_to_adam_sign_flips(compiled.leaves, eager.leaves, lr=3e-4, steps=4)
    for a, b in zip(eager.leaves, compiled.leaves, strict=True):
        for key, value in eager.optimizer.state[a].items():
            torch.testing.assert_close(compiled.optimizer.state[b][key], value,
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(compiled.objective, eager.objective, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(compiled.iwae_bound, eager.iwae_bound, rtol=1e-5, atol=1e-4)

    # No graph break on the hot path: the forward and the update are one graph each.
    bits, eps = compiled.draw(images)
    loss, log_w, objective, log_q_stop_z = compiled._loss(bits, None, eps)
    compiled.optimizer.zero_grad()
    loss.backward()
    for fn, args in ((compiled._loss, (bits, None, eps)),
                     (compiled._update, (log_w, objective, log_q_stop_z, None))):  # fmt: skip
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C compiler",
)
@requires_mnist
def test_a_compiled_run_compiles_each_region_once_without_graph_breaks(tmp_path):
    # Every run of steps asks the job for its optimizer; a flag set back on it (the config's
    # fused Adam) recompiled the update at every run until Dynamo crashed on its guards.
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from dreg.checkpointing import load_checkpoint
    from dreg.run import train
    from dreg.step import Replicas
    from tests.conftest import TINY_RUN, compose_config

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    overrides = ["trainer.max_steps=8", "model.steps_per_call=2", "model.compile=step"]
    metrics = train(compose_config([*TINY_RUN, *overrides], tmp_path))
    assert metrics["global_step"] == 8
    assert not counters["graph_break"], dict(counters["graph_break"])
    for region in (Replicas._loss, Replicas._update):
        assert len(_debug_get_cache_entry_list(region.__code__)) == 1, region.__name__

    # Its checkpoint carries the unfused Adam; an eager resume takes the config's fused one.
    def fused_flags() -> list[bool]:
        ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
        return [g["fused"] for g in ckpt["optimizer_states"][0]["param_groups"]]

    assert fused_flags() == [False, False]
    train(compose_config([*TINY_RUN, "trainer.max_steps=10", "resume=true"], tmp_path))
    assert fused_flags() == [True, True]
