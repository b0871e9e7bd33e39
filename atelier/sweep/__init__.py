"""Sweeps: naming jobs by what varies, resuming, summarising failures."""
