"""What a run or a sweep leaves on disk, besides the LoRA file itself (atelier.network.lora_file):
ss_* metadata (metadata.py), the run-dir records (run_dir.py), summary.json (summary.py), a
sweep's plan (sweep_plan.py: sweep.json), and who may write a run dir: its ownership check
(guard.py, a Hydra callback) and the one-writer lock (lock.py)."""
