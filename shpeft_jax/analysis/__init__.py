"""The paper's statistical study (Sec. 2.1, Fig. 2): sparsity and hybridity of fine-tuning.

`python -m shpeft_jax.analysis sparsity ...` and `python -m shpeft_jax.analysis hybridity ...`;
see docs/ANALYSIS.md.
"""
