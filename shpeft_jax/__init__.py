"""SH-PEFT in JAX/Flax: sparsity- and hybridity-inspired parameter-efficient fine-tuning."""

__version__ = "0.1.0"
