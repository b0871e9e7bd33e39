"""Hyperparameter search and pruning with Optuna: the study in the sweep dir, its search
space (Hydra's sweep grammar), the sampler and pruner, and each run's link to its trial."""
