"""What a process keeps and watches across jobs, used by every stage: stop signals (signals.py),
phase timings (phases.py), the base model and latents an in-process sweep's jobs share
(reuse.py), and the process's place in a data-parallel run (distributed.py)."""
