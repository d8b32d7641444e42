"""Launchers for people: the `flain` CLI, SuperLink/SuperNode process control, TLS material,
docker compose generation and result tables. The Flower apps never import this package."""
