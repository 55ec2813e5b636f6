"""A run on disk: the train state's checkpoints (saved, sealed with checksums, restored), parameters alone
(imports and init_from), the rules for resuming on a checkpoint directory, the preemption notice, and the
lease that keeps one writer per directory. Below the model: nothing here knows what the parameters are."""
