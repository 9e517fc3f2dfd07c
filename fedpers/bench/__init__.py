"""Benchmarks: ``python -m fedpers.bench`` (:mod:`fedpers.bench.core`), its sweep figure
(:mod:`fedpers.bench.sweep_figure`), shared helpers (:mod:`fedpers.bench.support`), the GPU check
(:mod:`fedpers.bench.gpu_check`, run as ``python -m fedpers.gpu_check``) and the poisoning drill of the
robust aggregation rules (:mod:`fedpers.bench.poison`, ``python -m fedpers.bench.poison``)."""
