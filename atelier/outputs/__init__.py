"""What a run leaves on disk: LoRA files and their ss_* metadata (lora_file.py, metadata.py), the
run-dir records (run_dir.py), summary.json (summary.py), and who may write a run dir: its
ownership check (guard.py, a Hydra callback) and the one-writer lock (lock.py)."""
