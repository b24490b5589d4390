"""Recovery: budget presets, the training corpus, the training loop, the attention-transfer
and LoRA stages, and the recovered-checkpoint cache.

Called with explicit arguments (seed, progress, checkpoint dir); no ambient state.
May import: linbench.methods, linbench.kernels, linbench.assets, linbench.records,
linbench.errors, linbench.units. Never run, speed or report.
"""
