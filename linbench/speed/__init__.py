"""Speed and memory sweeps: shape planning, the targets timed (kernels, fla peers, whole
models), the one timing loop, the one FLOP/roofline model and the one peer list.

May import: linbench.kernels, linbench.methods (through the registry), linbench.assets,
linbench.records, linbench.registry, linbench.errors, linbench.units. Never recovery,
run or report.
"""
