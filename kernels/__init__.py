"""Triton kernels of divco, installed as ``divco.kernels``."""
