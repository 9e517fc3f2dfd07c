"""Benchmarks: ``python -m fedpers.bench`` (:mod:`fedpers.bench.core`), its sweep figure
(:mod:`fedpers.bench.sweep_figure`), shared helpers (:mod:`fedpers.bench.support`) and the GPU check
(:mod:`fedpers.bench.gpu_check`, run as ``python -m fedpers.gpu_check``)."""
