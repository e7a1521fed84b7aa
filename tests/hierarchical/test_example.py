"""The hierarchical example runs, learns, and stays in sync with docs/library.md."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import torch

from dreg.library import HierarchicalProposal, monte_carlo_objective

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "hierarchical_example.py"


def load_example():
    spec = importlib.util.spec_from_file_location("hierarchical_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bound_and_exact(model, layers, data, num_samples: int = 16, seed: int = 1):
    """``[N]`` IWAE bound and exact log p(x) on the whole data set."""
    q_z1, q_z2 = layers
    torch.manual_seed(seed)
    with torch.no_grad():
        proposal = HierarchicalProposal([lambda: q_z1(data), q_z2])
        result = monte_carlo_objective(
            proposal, lambda z: model.log_joint(data, z), num_samples, "iwae"
        )
        return result.objective, model.log_marginal(data)


def test_example_learns_and_its_bound_stays_below_the_exact_likelihood(capsys):
    example = load_example()
    before = bound_and_exact(*example.train(steps=0))
    model, layers, data = example.train(steps=200)
    bound, exact = bound_and_exact(model, layers, data)
    assert "IWAE bound" in capsys.readouterr().out
    # Training raised the model's exact log-likelihood and closed the gap to the bound.
    assert exact.mean() > before[1].mean()
    gap, gap_before = exact - bound, before[1] - before[0]
    assert gap.mean() < gap_before.mean()
    # E[IWAE bound] <= log p(x) (Jensen): the mean gap is >= 0 up to 4 standard errors.
    assert gap.mean() >= -4 * gap.std() / math.sqrt(len(gap))


def test_docs_show_the_example_verbatim():
    docs = (ROOT / "docs" / "library.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, flags=re.DOTALL)
    assert EXAMPLE.read_text() in blocks
