"""Optimisation: the optimizer built from the config (optimizers.py), its learning-rate
schedule (schedulers.py) and the schedule's plot (lr_plot.py). (The learning-rate finder reads
a finished run's metrics, so it is the loop's: atelier.loop.lr_find.)"""
