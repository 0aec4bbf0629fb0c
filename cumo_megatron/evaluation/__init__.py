"""Benchmark evaluation of CuMo models: scoring answers the way each benchmark publishes its figures.

* ``scoring``        one module per benchmark family and a registry (``score_benchmark``,
  ``BENCHMARKS``); pure Python + numpy, no torch, so answers can be scored anywhere.
* ``results_table``  several scored benchmarks to one table in the CuMo paper's column order
  (Markdown and JSON).
"""
