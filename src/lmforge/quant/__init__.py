"""Post-training quantization, pruning, and measurement of what they cost (the core of ``lmforge quantize``).

- :mod:`lmforge.quant.methods`: quantizers by name (``available``, ``quantize``, ``save``, ``load``)
- :mod:`lmforge.quant.prune`: magnitude, Wanda and 2:4 pruning, ``sparsity_report``
- :mod:`lmforge.quant.measure`: parameter bytes, folder size, latency, tokens/s, perplexity, top-1 agreement

Submodules import their libraries (torchao, optimum-quanto, bitsandbytes) only when a method runs.
"""
