"""SH-PEFT core: importance scores, exact global top-k selection, masked optimisation, mask files.

Pipeline (see docs/SHPEFT.md):
  acc, info = score_dataset(cross_entropy_loss_fn(model.apply), params, batches)   # one epoch
  scores = hybrid_importance(params, acc, estimator='l2', lam=1.0, mode='hybrid')
  mask, sel = select_top_k(scores, k_percent=1.0)          # head: None -> fully trainable
  tx, schedule = shpeft_jax.optim.build(config.optim, num_steps, mask)  # frozen: bit-identical
  save_mask(path, mask); save_mask_stats(path, mask, sel); plot_mask_stats(stats, png)
"""

import importlib

# Exported lazily (PEP 562): importing `shpeft_jax.peft.defaults` (every config file does) must not
# import JAX, so that `--help` and config errors answer at once.
_EXPORTS = {
    "importance": ("accumulate_gradients", "chunk_sharding", "cross_entropy_loss_fn",
                   "hybrid_importance", "score_dataset", "scored_mask_tree", "task_agnostic",
                   "task_dependent", "warm_up_head"),
    "mask_io": ("build_mask_stats", "load_mask", "load_mask_stats", "plot_mask_stats",
                "save_mask", "save_mask_stats"),
    "masking": ("MaskedUpdateState", "apply_updates", "is_mask_leaf", "masked_update",
                "state_masks"),
    "selection": ("SelectionInfo", "kind_of", "layer_of", "mask_statistics", "param_type_of",
                  "resolve_k", "select_top_k"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
  if name in _MODULE_OF:
    return getattr(importlib.import_module(f"shpeft_jax.peft.{_MODULE_OF[name]}"), name)
  raise AttributeError(f"module 'shpeft_jax.peft' has no attribute {name!r}")


__all__ = [
    "accumulate_gradients", "chunk_sharding", "cross_entropy_loss_fn", "hybrid_importance",
    "score_dataset", "scored_mask_tree", "task_agnostic", "task_dependent", "warm_up_head",
    "build_mask_stats", "load_mask", "load_mask_stats", "plot_mask_stats", "save_mask",
    "save_mask_stats", "MaskedUpdateState", "apply_updates", "is_mask_leaf", "masked_update",
    "state_masks",
    "SelectionInfo", "kind_of", "layer_of", "mask_statistics", "param_type_of", "resolve_k",
    "select_top_k",
]
