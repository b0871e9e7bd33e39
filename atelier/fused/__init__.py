"""Several LoRA configs trained in one pass over one frozen base model (issue 8).

What is only about several lanes; the loop is a plain run's (atelier.loop.loop.TrainingLoop).

atelier.fused.slots: the patched base layers (base once, each lane's LoRA on its rows).
atelier.fused.trainer: FusedTrainer / run_fused: K lanes, each an ordinary Adapter, their exits.
atelier.fused.grouping: which configs can be lanes of one group.
atelier.fused.lane_logs: each lane's own train.log.
atelier.fused.worker: the process that trains one group of a sweep.
"""
