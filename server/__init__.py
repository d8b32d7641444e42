"""Flower ServerApp: training loop wiring, central evaluation, results."""
