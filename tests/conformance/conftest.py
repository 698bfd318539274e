"""Conformance suite: prints the seed of the grid sample this run drew (see _grid.py)."""
from tests.conformance import _grid


def pytest_terminal_summary(terminalreporter):
    if not _grid.DRAWN:
        return
    full = sum(n for n, _ in _grid.DRAWN.values())
    drawn = sum(k for _, k in _grid.DRAWN.values())
    terminalreporter.write_sep("-", "attnkern conformance grids")
    terminalreporter.write_line(
        f"seed {_grid.SEED}: {drawn} of {full} grid cases per backend "
        f"(rerun this sample: ATTNKERN_CONFORMANCE_SEED={_grid.SEED}; every case: ATTNKERN_CONFORMANCE_FULL=1)")
    for name, (n, k) in sorted(_grid.DRAWN.items()):
        terminalreporter.write_line(f"  {name}: {k} of {n}")
