"""Helpers shared by the analysis tests: a fake fine-tune of a tiny model and checkpoint writing."""

import jax
import numpy as np

from shpeft_jax import checkpoints

NUM_CLASSES = 3


def perturb(params, seed: int, scale: float = 0.05):
  """A fake 'fine-tune': every encoder weight moves by a random amount (continuous, no ties), with
  per-tensor scales that differ so the global top-k spans tensors unevenly, and a new head."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten(params["encoder"])
  moved = [np.asarray(x, np.float32) + (scale * rng.uniform(0.2, 2.0)
                                        * rng.standard_normal(np.shape(x))).astype(np.float32)
           for x in leaves]
  head = jax.tree_util.tree_map(
      lambda x: rng.standard_normal(np.shape(x)).astype(np.float32), params["head"])
  return {"encoder": jax.tree_util.tree_unflatten(treedef, moved), "head": head}


def zeros_like_model(model_name: str, image_size: int | None = None):
  """Params of the right names and shapes without running init (jax.eval_shape): cheap."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  model = clip_vit.build_model(model_name, NUM_CLASSES, image_size=image_size)
  size = model.config.image_size
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def random_like_model(model_name: str, seed: int = 0):
  """'Pretrained' params: N(0, 0.1) everywhere (LayerNorm scales around 1), no flax init run."""
  rng = np.random.default_rng(seed)
  zeros = zeros_like_model(model_name)
  def draw(path, x):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (base + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, zeros)


def write_ckpt(path, params, model="test_tiny", image_size=16, num_classes=NUM_CLASSES):
  return checkpoints.save_params(str(path), params, {"model": model, "image_size": image_size,
                                                     "num_classes": num_classes})
