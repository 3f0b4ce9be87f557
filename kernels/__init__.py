"""Triton kernels of atom-fast (this folder installs as ``atom_fast.kernels``)."""
