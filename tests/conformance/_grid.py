"""The parameter grids of the conformance suite and the seeded sample of them a run takes.

The full grids (our port of PyTorch's and FlashAttention's, shrunk to interpreter-sized
shapes) hold more cases than CI can run on the Triton interpreter, so each test function runs
a sample of its grid: ``SAMPLE[name]`` cases drawn with ``random.Random(f"{SEED}-{name}")``.
The seed is ``ATTNKERN_CONFORMANCE_SEED`` if set, else drawn fresh, so the sample changes from
run to run; it is printed at the end of the run (tests/conformance/conftest.py), and the
sampled parameters are in every test id. ``ATTNKERN_CONFORMANCE_FULL=1`` runs every case.
"""
from __future__ import annotations

import itertools
import os
import random
from typing import Dict, List, Sequence

SEED = int(os.environ.get("ATTNKERN_CONFORMANCE_SEED") or random.SystemRandom().randrange(1, 10**6))
FULL = os.environ.get("ATTNKERN_CONFORMANCE_FULL", "0") not in ("", "0")

#: (name of the grid, cases in the full grid, cases sampled) for the run summary.
DRAWN: Dict[str, tuple] = {}


def sample(name: str, grid: Sequence, n: int) -> List:
    """``n`` cases of ``grid`` (all of them under ATTNKERN_CONFORMANCE_FULL=1), seeded by the
    run's seed and the grid's name, in grid order."""
    grid = list(grid)
    if FULL or n >= len(grid):
        chosen = grid
    else:
        idx = sorted(random.Random(f"{SEED}-{name}").sample(range(len(grid)), n))
        chosen = [grid[i] for i in idx]
    DRAWN[name] = (len(grid), len(chosen))
    return chosen


def product(**axes) -> List[dict]:
    """Every combination of the axes, as dicts."""
    keys = list(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


def case_id(case: dict) -> str:
    return "-".join(f"{k}{getattr(v, '__name__', None) or str(v).replace('torch.', '')}" for k, v in case.items())
