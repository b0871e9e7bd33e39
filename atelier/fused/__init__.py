"""Several LoRA configs trained in one pass over one frozen base model (issue 8).

atelier.fused.slots: the patched base layers (base once, each lane's LoRA on its rows).
atelier.fused.trainer: FusedTrainer / run_fused: K lanes, each an ordinary Trainer.
"""
