"""Launchers: where and how the jobs of a sweep run."""
