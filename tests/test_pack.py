"""Packs (dreg/pack.py, hydra/launcher=packed): jobs trained as replicas of one model.

Layers: the joint step's gradients against each replica alone (every estimator in one pack,
float64, both ways of computing it); the scheduler's barrier; then the real command line:
a pack's records equal the jobs run alone, fault isolation, preemption and resume.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from dreg.checkpointing import load_checkpoint, rng_state, set_rng_state
from dreg.datamodules.binarized import Batch
from dreg.errors import EXIT_PREEMPTED
from dreg.estimators import Particles, estimator_by_name, estimator_classes, routed_loss
from dreg.lightning_module import DReGModule
from dreg.model import VAE
from dreg.pack import Pack, StepRequest, _Member, joint_step, stackable
from dreg.packed_launcher import plan_packs
from tests.conftest import ROOT, cli, requires_mnist, start_cli, wait_for

K, B, DX = 6, 5, 12


def replica(name: str, seed: int) -> DReGModule:
    torch.manual_seed(seed)
    net = VAE(DX, latent_dim=3, hidden_dims=[7, 7], train_mean=torch.rand(DX)).double()
    estimator = estimator_by_name(name).double()
    module = DReGModule(net, estimator, partial(torch.optim.Adam), num_samples=K)
    module.manual_backward = lambda loss: loss.backward()  # no trainer: fp32 Lightning's backward
    return module


def gradients(module: DReGModule) -> list[torch.Tensor]:
    params = [*module.net.parameters(), *module.estimator.parameters()]
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def solo_gradients(module: DReGModule, batch: Batch, rng: dict) -> list[torch.Tensor]:
    """The reference: the replica's step taken alone, with its own noise."""
    set_rng_state(rng)
    particles, weights = module.estimate(batch)
    routed_loss(particles, weights, train_model=module.train_model).backward()
    grads = gradients(module)
    for p in [*module.net.parameters(), *module.estimator.parameters()]:
        p.grad = None
    return grads


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("batched", "device"),
    [(False, "cpu"), (True, "cpu"), pytest.param(True, "cuda", marks=CUDA)],
    ids=["one-after-another", "stacked", "stacked-cuda"],
)
def test_every_estimator_in_one_pack_gets_its_solo_gradient(batched, device):
    names = sorted(estimator_classes())
    modules = [replica(name, seed).to(device) for seed, name in enumerate(names)]
    batches, states = [], []
    for seed in range(len(names)):
        torch.manual_seed(100 + seed)
        x = torch.bernoulli(torch.rand(B, DX, dtype=torch.float64))
        batches.append(Batch(x.to(device)))
        states.append(rng_state())
    expected = [solo_gradients(m, b, s) for m, b, s in zip(modules, batches, states, strict=True)]

    requests = [
        StepRequest(m, b, member=_Member(i, m.estimator.name, rng=s))
        for i, (m, b, s) in enumerate(zip(modules, batches, states, strict=True))
    ]
    assert stackable([m.net for m in modules])
    joint_step(requests, batched=batched)
    for name, module, want in zip(names, modules, expected, strict=True):
        got = gradients(module)
        for g, w in zip(got, want, strict=True):
            if batched:  # batched matrix products sum in another order
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)
            else:
                assert torch.equal(g, w), name
    # Each replica's stream advanced exactly as its solo step advanced it.
    set_rng_state(states[0])
    modules[0].estimate(batches[0])
    assert torch.equal(requests[0].member.rng["torch"], torch.get_rng_state())


def test_a_nan_in_one_replica_reaches_no_other():
    modules = [replica("dreg_iwae", 0), replica("iwae", 1)]
    with torch.no_grad():
        modules[0].net.decoder[0].weight.fill_(float("nan"))
    torch.manual_seed(0)
    batch = Batch(torch.bernoulli(torch.rand(B, DX, dtype=torch.float64)))
    state = rng_state()
    expected = solo_gradients(modules[1], batch, state)
    requests = [
        StepRequest(m, batch, member=_Member(i, str(i), rng=state)) for i, m in enumerate(modules)
    ]
    joint_step(requests, batched=True)
    assert not torch.isfinite(requests[0].loss)
    for g, w in zip(gradients(modules[1]), expected, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_the_barrier_steps_every_waiting_job_together():
    """Jobs that reach the barrier different numbers of times: joint steps count the most
    steps any job takes, every job's requests are served, results come back in job order."""
    pack = Pack()
    taken: list[tuple[int, int]] = []

    class Module:  # the part of a DReGModule that joint_step uses, recording the steps
        train_model, antithetic, num_samples = True, False, 1

        def __init__(self, index: int) -> None:
            self.index, self.weight = index, torch.ones((), requires_grad=True)

        def manual_backward(self, loss):
            loss.backward()

        def estimate(self, batch):
            taken.append((self.index, pack.steps))
            log_w = self.weight * torch.ones(1, 1)
            return _particles(log_w), estimator_by_name("iwae")(log_w.detach())

    def job(index: int, steps: int) -> int:
        module = Module(index)
        for _ in range(steps):
            pack.step(StepRequest(module, Batch(torch.zeros(1, 1))))
        return index

    results = pack.run([(str(i), partial(job, i, n)) for i, n in enumerate([3, 1, 2])])
    assert results == [0, 1, 2]
    assert pack.steps == 3
    assert sorted(taken) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]


def _particles(log_w: torch.Tensor) -> Particles:
    zero = torch.zeros_like(log_w)
    z = torch.zeros((*log_w.shape, 1), requires_grad=True)
    return Particles(log_p=log_w + (z.sum(-1) * 0), log_q_stopped=zero, log_q_stop_z=zero,
                     z_for_p=z)  # fmt: skip


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
        assert results(pack / job) == results(alone / job)  # bitwise
        assert results(ones / job) == results(alone / job)
        for sweep in (pack, ones):  # every logged value, every row
            assert (sweep / job / "csv" / "metrics.csv").read_text() == (
                alone / job / "csv" / "metrics.csv"
            ).read_text()
            assert (sweep / job / ".hydra" / "config.yaml").exists()
            # Each job's train.log holds its own lines only: one fit, one test.
            log = (sweep / job / "train.log").read_text()
            assert log.count("Seed set to 0") == log.count("Restoring states") == 1
    assert [r["status"] for r in summary(pack).values()] == ["completed"] * 3
    sizes = [json.loads((s / "0" / "metrics.json").read_text())["pack_size"] for s in (pack, ones)]
    assert sizes == [3, 1]
    # dreg.report reads a packed sweep as any other.
    report = subprocess.run([sys.executable, "-m", "dreg.report", str(pack)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "dreg_cv" in (pack / "results.md").read_text()


@requires_mnist
@pytest.mark.slow
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
    for name, args in uses.items():
        run = tmp_path / name
        used = cli("debug=fast", "model.num_samples=4", *args, f"ckpt_path={ckpt}",
                   f"hydra.run.dir={run}")  # fmt: skip
        assert used.returncode == 0, (name, used.stderr[-3000:])
        assert json.loads((run / "status.json").read_text())["status"] == "completed", name


def test_a_bad_launcher_option_is_one_line_before_any_job(tmp_path):
    result = cli("-m", *SWEEP, PACKED, "hydra.launcher.max_pack_size=0",
                 f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: hydra.launcher.max_pack_size=0: must be an integer >= 1"
    ]
    assert not list(tmp_path.glob("*/.hydra"))


@requires_mnist
@pytest.mark.slow
def test_a_job_that_diverges_fails_alone_and_the_others_finish_as_alone(tmp_path):
    lrs = "model.optimizer.lr=3e-4,30"  # lr=30 makes the second step non-finite
    args = [*SWEEP, "trainer.max_steps=6", "trainer.val_check_interval=1", lrs]
    result = cli("-m", *args, PACKED, f"hydra.sweep.dir={tmp_path / 'pack'}")
    assert result.returncode != 0  # as with any launcher: Hydra reports the failure at the end
    rows = summary(tmp_path / "pack")
    assert rows["0"]["status"] == "completed"
    assert rows["1"]["status"] == "failed" and "non-finite" in rows["1"]["error"]
    failed = tmp_path / "pack" / "1"
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 6
    assert load_checkpoint(failed / "checkpoints" / "last.ckpt")["global_step"] == 1  # last good
    result = cli(*[a for a in args if a != lrs and "sweep" not in a], "model.optimizer.lr=3e-4",
                 f"hydra.run.dir={tmp_path / 'alone'}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(tmp_path / "pack" / "0") == results(tmp_path / "alone")

    # model.nonfinite=skip: the diverging job drops its own updates only.
    skip = tmp_path / "skip"
    result = cli("-m", *args, "model.nonfinite=skip", PACKED, f"hydra.sweep.dir={skip}")
    assert result.returncode == 0, result.stderr[-3000:]
    with (skip / "1" / "csv" / "metrics.csv").open() as f:
        skipped = [float(r["train/skipped_steps"]) for r in csv.DictReader(f)
                   if r.get("train/skipped_steps")]  # fmt: skip
    assert skipped and skipped[-1] >= 1
    assert results(skip / "0") == results(tmp_path / "alone")


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
    for job in ("0", "1", "2"):
        assert results(sweep / job) == results(tmp_path / "whole" / job)
        assert (sweep / job / "csv" / "metrics.csv").read_text() == (
            tmp_path / "whole" / job / "csv" / "metrics.csv"
        ).read_text()
