"""Launchers: one job as train.py runs it (job.py: typed config, replay record, training or
data-parallel processes), and where the jobs of a sweep run (local_gpus.py, fused.py, the
process queue, SLURM through hydra-submitit)."""
