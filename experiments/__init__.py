"""Experiments: diagnostic probes (experiments/router) and the claim-by-claim harness (experiments/science)."""
