"""Evaluation protocols (linear probe, fine-tune, kNN) and online probes."""
