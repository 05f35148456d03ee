"""CLIP ViT vision towers in Flax and their PyTorch converters."""

from shpeft_jax.models.clip_vit import (AdditiveConfig, ClipClassifier, ViTConfig,
                                        VisionTransformer, build_model, get_model_config,
                                        init_params, model_names)
