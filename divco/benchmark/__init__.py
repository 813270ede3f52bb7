"""Benchmarks of divco.

divco.benchmark.ops: micro-benchmarks of the fused co-training loss (forward + backward)
against the eager and torch.compile'd reference; the other modules hold the suite that
``divco bench`` runs. Submodules are imported on use (some need optional packages).
"""
