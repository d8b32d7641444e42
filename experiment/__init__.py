"""Experiment definition shared by server and clients: configuration, data sets, CLI."""
