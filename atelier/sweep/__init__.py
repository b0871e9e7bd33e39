"""Sweeps: the Hydra sweeper (sweeper.py) that names jobs by what varies (naming.py), composes
their configs once (compose_once.py), resumes and places changed jobs (placement.py),
summarises how each job ended (outcome.py) and writes the report when done; a search's rounds
(search.py) and a pruned grid's trials (grid_trials.py)."""
