"""Evaluation harness and command line of manifold-defense: ``python -m eval <command>``."""
