"""The control path for adapter weights: reading and validating PEFT checkpoints, sources, the store actor."""
