"""Packs (dreg/pack.py, hydra/launcher=packed): jobs trained as replicas of one batched model.

Layers: the stacked step (:class:`dreg.step.Replicas` over ``torch.func.vmap``) against each
replica's step computed alone by the library path (every estimator in one pack, float64,
conditional model included); non-finite isolation; then the real command line: a pack's
records equal the jobs run alone, uneven runs, fault isolation, preemption and resume.

The packs themselves always run through ``train.py -m ... hydra/launcher=packed``. A job "run
alone" that a pack is compared with to float round-off, and the runs that use a packed job's
checkpoint, call :func:`dreg.run.main` (what ``train.py`` runs for one job) in process: the
same run without another few seconds of importing Lightning. Bitwise comparisons stay between
command-line runs (the same process settings on both sides).
"""

from __future__ import annotations

import csv
import json
import math
import signal
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.trainer.states import RunningStage

from dreg.checkpointing import load_checkpoint
from dreg.cohort import OWN_PASS_BYTES, Cohorts
from dreg.errors import EXIT_PREEMPTED, EXIT_SWEEP_FAILED, ConfigError
from dreg.estimators import estimator_by_name, estimator_classes, routed_loss
from dreg.hierarchical import TwoLayerVAE
from dreg.lightning_module import DReGModule
from dreg.model import VAE
from dreg.pack import Pack, _Member
from dreg.packed_launcher import check_options, plan_packs
from dreg.report import write_report
from dreg.run import main
from dreg.step import Replicas, draw_noise
from tests.conftest import (
    NO_PROGRESS_BAR,
    cli,
    compose_config,
    requires_mnist,
    start_cli,
    wait_for,
)
from tests.estimators.cases import GROUPED, GROUPS

K, B, DX, C = 6, 5, 12, 4


def replica(name: str, seed: int, context_dim: int = 0) -> DReGModule:
    torch.manual_seed(seed)
    net = VAE(DX, latent_dim=3, hidden_dims=[7, 7], train_mean=torch.rand(DX),
              context_dim=context_dim).double()  # fmt: skip
    params = {"groups": GROUPS} if name in GROUPED else {}  # M must divide K = 6
    estimator = estimator_by_name(name, **params).double()
    return DReGModule(net, estimator, partial(torch.optim.Adam, lr=1e-2), num_samples=K)


def optimizer_of(module: DReGModule) -> torch.optim.Optimizer:
    return module.configure_optimizers()


def split(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """struct-MNIST's split, in miniature: the last C pixels are the context."""
    return (bits[..., :DX], bits[..., DX:]) if bits.shape[-1] > DX else (bits, None)


def library_step(module: DReGModule, grey: torch.Tensor, seed: int) -> dict:
    """The reference: one replica's gradient by the library path (``VAE.particles``, the
    estimator, ``routed_loss``), with the draws a job's generator makes (binarize, then eps)."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.bernoulli(grey, generator=generator)
    eps = draw_noise((K, B, 3), generator, False, grey)
    x, context = split(bits)
    particles = module.net.particles(x, K, context, noise=eps)
    weights = module.estimator(particles.log_w)
    loss = routed_loss(particles, weights, module.train_model)  # + aux_loss (dreg_cv)
    params = [*module.net.parameters(), *module.estimator.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {
        "grads": [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ],
        "objective": weights.objective.mean(),
        "generator": generator.get_state(),
    }


def packed_step(modules: list[DReGModule], grey: torch.Tensor, seeds: list[int]) -> tuple:
    """One step of the modules as one stacked model; each replica's gradient as it was
    before the update, and the replicas."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    replicas = Replicas.stacked(modules, [optimizer_of(m) for m in modules], generators,
                                **modules[0].step_settings())  # fmt: skip
    seen: dict[int, list[torch.Tensor]] = {}

    def observe(m: int) -> None:
        names = [name for name, _ in modules[m].net.named_parameters()]
        net = [replicas.params[name].grad[m].clone() for name in names]
        own = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
               for p in modules[m].estimator.parameters()]  # fmt: skip
        seen[m] = net + own

    for m in range(len(modules)):
        replicas.observers[m] = observe
    replicas.start_run()
    replicas.step(grey, split, torch.Tensor.backward)
    return seen, replicas, generators


@pytest.mark.parametrize("context_dim", [0, C], ids=["mnist-like", "struct-mnist-like"])
def test_every_estimator_in_one_pack_gets_its_solo_gradient(context_dim):
    """Each estimator twice, side by side: runs of replicas with one estimator take one
    call of it (:func:`dreg.step.estimator_groups`)."""
    names = sorted(estimator_classes()) * 2
    names.sort()
    seeds = list(range(len(names)))
    modules = [replica(name, seed, context_dim) for name, seed in zip(names, seeds, strict=True)]
    torch.manual_seed(100)
    grey = torch.rand(len(names), B, DX + context_dim, dtype=torch.float64)
    want = [library_step(m, grey[i], seeds[i]) for i, m in enumerate(modules)]
    seen, replicas, generators = packed_step(modules, grey, seeds)
    for i, name in enumerate(names):
        for g, w in zip(seen[i], want[i]["grads"], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(replicas.objective[i], want[i]["objective"].float())
        # Each replica's generator advanced exactly as its solo step advanced it.
        assert torch.equal(generators[i].get_state(), want[i]["generator"]), name


def test_a_stacked_copy_of_one_replica_gets_its_solo_gradient():
    """M = 1 stacked (copies, not the module's own parameters) is still that replica."""
    module = replica("dreg_iwae", 0)
    torch.manual_seed(100)
    grey = torch.rand(1, B, DX, dtype=torch.float64)
    want = library_step(replica("dreg_iwae", 0), grey[0], 0)
    seen, _, _ = packed_step([module], grey, [0])
    for g, w in zip(seen[0], want["grads"], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["dreg_iwae", "iwae"])
def test_the_two_layer_model_packs_with_its_solo_gradients(name):
    """The other model (two stochastic layers, its own ``propose`` and ``log_joint``) under
    vmap gives each replica the gradient of the same replica stepped alone, in float64."""

    def job(seed: int) -> DReGModule:
        torch.manual_seed(seed)
        net = TwoLayerVAE(DX, latent_dims=(3, 2), hidden_dims=((7,), (5,))).double()
        return DReGModule(net, estimator_by_name(name).double(),
                          partial(torch.optim.Adam, lr=1e-2), num_samples=K)  # fmt: skip

    torch.manual_seed(100)
    grey = torch.rand(3, B, DX, dtype=torch.float64)
    seen, _, _ = packed_step([job(s) for s in range(3)], grey, [0, 1, 2])
    for m in range(3):
        want, _, _ = packed_step([job(m)], grey[m : m + 1], [m])
        for got, ref in zip(seen[m], want[0], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_jobs_are_stacked_replicas_per_pass_at_a_time():
    """``hydra.launcher.replicas_per_pass``: jobs that could share one stacked model take
    their steps in stacks of that many (the last one shorter); a stack of one is the job
    trained in place, as alone. ``auto`` on a CPU: one stack for small replicas, one stack
    per job once a replica's decoder output [K, B, D] reaches ``OWN_PASS_BYTES``. Compiled
    steps stay one stack (one graph for all)."""
    jobs = [replica("dreg_iwae", seed) for seed in range(5)]  # float64, K = 6

    def stacks(setting: int | str, width: int) -> list[int]:
        group = SimpleNamespace(rows=torch.zeros(2, 1), data=torch.zeros(4, width))
        requests = [SimpleNamespace(job=job, group=group) for job in jobs]
        return [len(stack) for stack in Cohorts(setting)._stacks(requests)]

    needed = -(-OWN_PASS_BYTES // (K * 8))  # B * D elements of float64 that reach it
    assert stacks("auto", needed - 1) == [5]
    assert stacks("auto", needed) == [1] * 5
    assert stacks(2, needed - 1) == [2, 2, 1]
    assert stacks(8, needed) == [5]
    for job in jobs:
        job.compile_mode = "step"
    assert stacks(1, needed) == [5]


def test_jobs_that_differ_in_k_are_refused_in_one_line():
    modules = [replica("dreg_iwae", 0), replica("dreg_iwae", 1)]
    modules[1].num_samples = K + 2
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with pytest.raises(ValueError, match=f"job 1 of a stacked pack has model.num_samples={K + 2}"):
        Replicas.stacked(modules, [optimizer_of(m) for m in modules], generators,
                         **modules[0].step_settings())  # fmt: skip


def test_the_stacked_update_is_each_jobs_own_optimizer_step():
    """After the step, each job's parameters and Adam state (written back by store) equal
    the job's own optimizer applied to its own gradient."""
    modules = [replica("dreg_iwae", 0), replica("iwae", 1)]
    alone = [replica("dreg_iwae", 0), replica("iwae", 1)]
    torch.manual_seed(100)
    grey = torch.rand(2, B, DX, dtype=torch.float64)
    _, replicas, _ = packed_step(modules, grey, [0, 1])
    optimizers = [optimizer_of(m) for m in modules]
    replicas.store(modules, optimizers)
    for i, module in enumerate(alone):
        opt = optimizer_of(module)
        grads = library_step(module, grey[i], i)["grads"]
        for p, g in zip(
            [*module.net.parameters(), *module.estimator.parameters()], grads, strict=True
        ):
            p.grad = g
        opt.step()
        for name, want in module.net.named_parameters():
            got = dict(modules[i].net.named_parameters())[name]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
            state = optimizers[i].state[got]
            torch.testing.assert_close(state["exp_avg_sq"], opt.state[want]["exp_avg_sq"])


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_nan_in_one_replica_reaches_no_other(policy):
    modules = [replica("dreg_iwae", 0), replica("iwae", 1)]
    for module in modules:
        module.nonfinite = policy
    with torch.no_grad():
        modules[0].net.decoder[0].weight.fill_(float("nan"))
    before = [p.detach().clone() for p in modules[0].net.parameters()]
    torch.manual_seed(100)
    grey = torch.rand(2, B, DX, dtype=torch.float64)
    want = library_step(replica("iwae", 1), grey[1], 1)
    seen, replicas, _ = packed_step(modules, grey, [0, 1])
    for g, w in zip(seen[1], want["grads"], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    replicas.store(modules, [optimizer_of(m) for m in modules])
    first_bad, skipped = replicas.faults()
    assert first_bad == [0, -1]
    assert skipped == ([1, 0] if policy == "skip" else [0, 0])
    for p, saved in zip(modules[0].net.parameters(), before, strict=True):
        assert torch.equal(p, saved) or (p.isnan() == saved.isnan()).all()  # not updated
    assert all(torch.isfinite(p).all() for p in modules[1].net.parameters())


def test_clip_grad_norm_bounds_each_replicas_own_gradient():
    modules = [replica("dreg_iwae", 0), replica("iwae", 1)]
    torch.manual_seed(100)
    grey = torch.rand(2, B, DX, dtype=torch.float64)
    norms = [torch.cat([g.flatten() for g in library_step(m, grey[i], i)["grads"]]).norm()
             for i, m in enumerate([replica("dreg_iwae", 0), replica("iwae", 1)])]  # fmt: skip
    clip = float(min(norms)) / 2
    for module in modules:
        module.clip_grad_norm = clip
    seen, _, _ = packed_step(modules, grey, [0, 1])
    for m in range(2):
        got = torch.cat([g.flatten() for g in seen[m]]).norm()
        assert math.isclose(float(got), clip, rel_tol=1e-5), (m, float(got), clip)


def test_packs_group_equal_keys_in_sweep_order_up_to_the_size_bound():
    keys = ["a", "b", "a", None, "a", "b"]
    assert plan_packs(keys, 2) == [[0, 2], [1, 5], [3], [4]]
    assert plan_packs(keys, 48) == [[0, 2, 4], [1, 5], [3]]


# -- the real command line ------------------------------------------------------------------
# Short job folders: every task override would otherwise be part of the name.
SWEEP = ["debug=fast", "model.num_samples=4", "hydra.sweep.subdir=${hydra:job.num}"]
SHORT = ["trainer.max_steps=6", "trainer.val_check_interval=3"]
ESTIMATORS = "estimator=iwae,dreg_cv,rws"
PACKED = "hydra/launcher=packed"


def results(job: Path) -> dict:
    metrics = json.loads((job / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, float) and "seconds" not in k}


def assert_close_records(got: Path, want: Path, rel: float = 1e-4) -> None:
    """A packed job against its run alone: the same metrics and the same logged rows (same
    keys, same steps), values equal to float round-off (the stacked model's batched products
    sum in another order). The measured size of the difference: docs/benchmarks.md."""
    a, b = results(got), results(want)
    assert a.keys() == b.keys()
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=rel, abs_tol=rel), (key, a[key], b[key])
    rows = [
        list(csv.DictReader((job / "csv" / "metrics.csv").read_text().splitlines()))
        for job in (got, want)
    ]
    assert len(rows[0]) == len(rows[1])
    for row, other in zip(*rows, strict=True):
        assert row.keys() == other.keys() and row["step"] == other["step"]
        for key, value in row.items():
            if value and other[key]:
                assert math.isclose(float(value), float(other[key]), rel_tol=rel, abs_tol=rel)
            else:
                assert value == other[key], key


def alone_in_process(job: Path, *overrides: str) -> None:
    """One job of a sweep (:data:`SWEEP` plus ``overrides``) run alone, as the basic launcher
    runs it, in this process."""
    task = [a for a in SWEEP if not a.startswith("hydra.")]
    main(compose_config([*NO_PROGRESS_BAR, *task, *overrides], job))


def summary(sweep: Path) -> dict[str, dict]:
    with (sweep / "summary.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


@requires_mnist
@pytest.mark.slow
def test_a_pack_of_three_and_packs_of_one_record_what_the_jobs_record_alone(tmp_path):
    alone, pack, ones = tmp_path / "alone", tmp_path / "pack", tmp_path / "ones"
    one_each = [PACKED, "hydra.launcher.max_pack_size=1"]
    for sweep, extra in [(alone, []), (pack, [PACKED]), (ones, one_each)]:
        result = cli("-m", *SWEEP, *SHORT, ESTIMATORS, *extra, f"hydra.sweep.dir={sweep}")
        assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1", "2"):
        assert_close_records(pack / job, alone / job)
        assert results(ones / job) == results(alone / job)  # a pack of one: bitwise
        assert (ones / job / "csv" / "metrics.csv").read_text() == (
            alone / job / "csv" / "metrics.csv"
        ).read_text()
        for sweep in (pack, ones):
            assert (sweep / job / ".hydra" / "config.yaml").exists()
            # Each job's train.log holds its own lines only: one fit, one test.
            log = (sweep / job / "train.log").read_text()
            assert log.count("Seed set to 0") == log.count("Restoring states") == 1
    assert [r["status"] for r in summary(pack).values()] == ["completed"] * 3
    sizes = [json.loads((s / "0" / "metrics.json").read_text())["pack_size"] for s in (pack, ones)]
    assert sizes == [3, 1]
    # dreg.report reads a packed sweep as any other (its command line: tests/test_report.py).
    write_report(pack, pack)
    assert "dreg_cv" in (pack / "results.md").read_text()


@requires_mnist
@pytest.mark.slow
def test_jobs_of_uneven_length_on_struct_mnist_pack_and_finish_as_alone(tmp_path):
    """Runs of steps cut at different places (max_steps 5 and 11, 4 steps per call): the
    barrier waits for every job, each stops at its own max_steps; a conditional model packs."""
    task = ["dataset=struct_mnist", "model.steps_per_call=4", "trainer.val_check_interval=3"]
    args = [*SWEEP, *task]
    steps = "trainer.max_steps=5,11"
    pack = tmp_path / "pack"
    result = cli("-m", *args, steps, PACKED, f"hydra.sweep.dir={pack}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pack 1: done, 11 joint steps" in result.stdout + result.stderr
    alone = tmp_path / "alone"
    for job, want in (("0", 5), ("1", 11)):
        alone_in_process(alone / job, *task, f"trainer.max_steps={want}")
        metrics = json.loads((pack / job / "metrics.json").read_text())
        assert metrics["global_step"] == want and metrics["pack_size"] == 2
        assert_close_records(pack / job, alone / job)


@requires_mnist
@pytest.mark.slow
def test_one_step_per_call_still_steps_the_jobs_together(tmp_path):
    """model.steps_per_call=1: 6 joint steps for 2 jobs of 6 steps (one after another: 12)."""
    sweep = tmp_path / "pack"
    result = cli("-m", *SWEEP, "seed=0,1", "model.steps_per_call=1", "trainer.max_steps=6",
                 "trainer.val_check_interval=3", PACKED, f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr + "".join(p.read_text() for p in sweep.glob("*.log"))
    assert "Pack 1: done, 6 joint steps" in log, log[-2000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["global_step"] == 6


@requires_mnist
@pytest.mark.slow
# In process a warning fails the test: resume_from's is that it starts from another run's
# checkpoint, which is the point (the command line prints it).
@pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")
def test_a_packed_jobs_checkpoint_serves_every_mode_and_loggers_stay_apart(tmp_path):
    sweep = tmp_path / "pack"
    result = cli("-m", *SWEEP, *SHORT, "seed=0,1", "logger=wandb", PACKED,
                 f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ids = [(sweep / job / "wandb" / "run_id").read_text().strip() for job in ("0", "1")]
    assert ids[0] != ids[1]  # a W&B run of its own each, not the first job's
    for job, run_id in zip(("0", "1"), ids, strict=True):
        assert list((sweep / job / "wandb").glob(f"offline-run-*-{run_id}"))
    ckpt = sweep / "0" / "checkpoints" / "last.ckpt"
    uses = {
        "diagnose": ["mode=diagnose", "mode.num_samples=[2]", "mode.num_draws=2",
                     "mode.batch_size=4"],
        "bias_check": ["mode=bias_check", "estimator=dreg_iwae", "mode.num_batches=8",
                       "mode.batch_size=4"],
        "inference_only": ["train_model=false", "trainer.max_steps=2"],
        "resume_from": ["trainer.max_steps=8"],
    }  # fmt: skip
    for name, args in uses.items():  # in process: what train.py runs with these overrides
        run = tmp_path / name
        main(compose_config([*NO_PROGRESS_BAR, "debug=fast", "model.num_samples=4", *args,
                             f"ckpt_path={ckpt}"], run))  # fmt: skip
        assert json.loads((run / "status.json").read_text())["status"] == "completed", name


def test_a_jobs_work_after_training_is_not_the_others_training_time():
    """One thread of a pack runs at a time: while a job that finished training runs its
    test and records, the jobs still training wait, and their ``train_seconds`` must not
    count that wait (it is another run's test); a job whose training had ended keeps its
    time."""

    def job_clock(start: float, end: float | None) -> SimpleNamespace:
        timer = Timer()
        timer._start_time[RunningStage.TRAINING] = start
        timer._end_time[RunningStage.TRAINING] = end
        return SimpleNamespace(callbacks=[timer])

    now = time.monotonic()
    pack = Pack()
    tested, training, ended = (
        _Member(0, "tested", trainer=job_clock(now - 10, now - 4), finished=True),
        _Member(1, "training", trainer=job_clock(now - 10, None)),
        _Member(2, "ended", trainer=job_clock(now - 10, now - 4)),
    )
    pack._members = [tested, training, ended]
    pack._discount_work_after_training(tested)  # its 4 s since training ended
    started = training.trainer.callbacks[0].start_time("train")
    assert now - 6 <= started <= time.monotonic() - 6 + 1e-3
    assert ended.trainer.callbacks[0].time_elapsed("train") == pytest.approx(6)
    assert tested.trainer.callbacks[0].time_elapsed("train") == pytest.approx(6)


def test_a_bad_launcher_option_is_one_line_before_any_job(tmp_path):
    result = cli("-m", *SWEEP, PACKED, "hydra.launcher.max_pack_size=0",
                 f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: hydra.launcher.max_pack_size=0: must be an integer >= 1"
    ]
    assert not list(tmp_path.glob("*/.hydra"))
    # The other option goes through the same check (and the same line to stderr).
    for bad in (0, "all", True):
        with pytest.raises(ConfigError, match=r"replicas_per_pass=.*: must be auto or an integer"):
            check_options(48, bad)
    check_options(48, "auto")
    check_options(48, 3)


@requires_mnist
@pytest.mark.slow
def test_a_job_that_diverges_fails_alone_and_the_others_finish_as_alone(tmp_path):
    lrs = "model.optimizer.lr=3e-4,30"  # lr=30 makes the second step non-finite
    job = ["trainer.max_steps=6", "trainer.val_check_interval=1"]
    args = [*SWEEP, *job, lrs]
    result = cli("-m", *args, PACKED, f"hydra.sweep.dir={tmp_path / 'pack'}")
    assert result.returncode != 0  # as with any launcher: Hydra reports the failure at the end
    rows = summary(tmp_path / "pack")
    assert rows["0"]["status"] == "completed"
    assert rows["1"]["status"] == "failed" and "non-finite" in rows["1"]["error"]
    failed = tmp_path / "pack" / "1"
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 6
    assert load_checkpoint(failed / "checkpoints" / "last.ckpt")["global_step"] == 1  # last good
    alone_in_process(tmp_path / "alone", *job, "model.optimizer.lr=3e-4")
    assert_close_records(tmp_path / "pack" / "0", tmp_path / "alone")

    # model.nonfinite=skip: the diverging job drops its own updates only (as many as it
    # must: the bound on the skipped fraction, which would fail it, is lifted).
    # Its first update (lr=30) made weights whose test log-likelihood is not finite: that
    # job fails at evaluation (exit 6) instead of recording NaN; the other one completes.
    skip = tmp_path / "skip"
    result = cli("-m", *args, "model.nonfinite=skip", "model.max_skipped_fraction=1",
                 PACKED, f"hydra.sweep.dir={skip}")  # fmt: skip
    assert result.returncode == EXIT_SWEEP_FAILED, result.stderr[-3000:]
    rows = summary(skip)
    assert rows["0"]["status"] == "completed"
    assert json.loads((skip / "1" / "status.json").read_text())["exit_code"] == 6
    with (skip / "1" / "csv" / "metrics.csv").open() as f:
        skipped = [float(r["train/skipped_steps"]) for r in csv.DictReader(f)
                   if r.get("train/skipped_steps")]  # fmt: skip
    assert skipped and skipped[-1] >= 1
    assert_close_records(skip / "0", tmp_path / "alone")


@requires_mnist
@pytest.mark.slow
def test_a_preempted_pack_resumes_every_job_exactly(tmp_path):
    args = ["-m", *SWEEP, "trainer.max_steps=40", "trainer.val_check_interval=10", ESTIMATORS,
            PACKED]  # fmt: skip
    whole = cli(*args, f"hydra.sweep.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]

    sweep = tmp_path / "cut"
    proc = start_cli(*args, f"hydra.sweep.dir={sweep}")
    for job in ("0", "1", "2"):
        wait_for(sweep / job / "checkpoints" / "best-step10.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    for job in ("0", "1", "2"):
        status = json.loads((sweep / job / "status.json").read_text())
        assert status["status"] == "preempted", status
        assert 10 <= status["global_step"] < 40
        assert (sweep / job / "checkpoints" / "last.ckpt").exists()

    resumed = cli(*args, f"hydra.sweep.dir={sweep}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for job in ("0", "1", "2"):  # the same packed steps, cut and resumed: bitwise
        assert results(sweep / job) == results(tmp_path / "whole" / job)
        assert (sweep / job / "csv" / "metrics.csv").read_text() == (
            tmp_path / "whole" / job / "csv" / "metrics.csv"
        ).read_text()
