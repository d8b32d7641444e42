"""Flower ClientApp: benign and malicious local training."""
