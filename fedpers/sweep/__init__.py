"""Sweeps: a grid of strategies x settings x seeds, one results folder per cell.

``python -m fedpers.sweep GRID.yaml`` (:mod:`fedpers.sweep.cli`). Modules, lowest first:
:mod:`~fedpers.sweep.cells` (a cell, when it is done, its row; running one cell),
:mod:`~fedpers.sweep.stats` (hierarchical bootstrap, paired differences),
:mod:`~fedpers.sweep.report` (``runs.csv``, ``table.md``, plots),
:mod:`~fedpers.sweep.ray_cluster` (cells as Ray tasks), :mod:`~fedpers.sweep.local` (worker processes
and the grid runner), :mod:`~fedpers.sweep.cli` (grid files and the command line).
"""
