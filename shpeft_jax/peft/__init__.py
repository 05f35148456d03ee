"""SH-PEFT core: importance scores, exact global top-k selection, masked optimisation, mask files.

Pipeline (see docs/SHPEFT.md):
  acc, info = score_dataset(cross_entropy_loss_fn(model.apply), params, batches)   # one epoch
  scores = hybrid_importance(params, acc, estimator='l2', lam=1.0, mode='hybrid')
  mask, sel = select_top_k(scores, k_percent=1.0)          # head: None -> fully trainable
  tx, schedule = shpeft_jax.optim.build(config.optim, num_steps, mask)  # frozen: bit-identical
  save_mask(path, mask); save_mask_stats(path, mask, sel); plot_mask_stats(stats, png)
"""

from shpeft_jax.peft.importance import (
    accumulate_gradients, chunk_sharding, cross_entropy_loss_fn, hybrid_importance,
    score_dataset, scored_mask_tree, task_agnostic, task_dependent, warm_up_head)
from shpeft_jax.peft.mask_io import (
    build_mask_stats, load_mask, load_mask_stats, plot_mask_stats, save_mask, save_mask_stats)
from shpeft_jax.peft.masking import (
    MaskedUpdateState, apply_updates, is_mask_leaf, masked_update, state_masks)
from shpeft_jax.peft.selection import (
    SelectionInfo, kind_of, layer_of, mask_statistics, param_type_of, resolve_k, select_top_k)

__all__ = [
    "accumulate_gradients", "chunk_sharding", "cross_entropy_loss_fn", "hybrid_importance",
    "score_dataset", "scored_mask_tree", "task_agnostic", "task_dependent", "warm_up_head",
    "build_mask_stats", "load_mask", "load_mask_stats", "plot_mask_stats", "save_mask",
    "save_mask_stats", "MaskedUpdateState", "apply_updates", "is_mask_leaf", "masked_update",
    "state_masks",
    "SelectionInfo", "kind_of", "layer_of", "mask_statistics", "param_type_of", "resolve_k",
    "select_top_k",
]
