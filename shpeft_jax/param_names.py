"""The parameter-name vocabulary: the one module that knows what a '/'-joined parameter name means.

A classifier's params are {'encoder': CLIP tower, 'head': linear classifier}. The additive PEFT
hooks of `models/clip_vit.py` create leaves whose module names start with one of
`ADDITIVE_PREFIXES` (LoRA factors `lora_<op>/{a,b}`, the AdaptFormer `adapter`, SSF
`ssf_<op>/{scale,shift}`, VPT `vpt_prompts_<i>`). Everything else under 'encoder/' is a pretrained
("backbone") weight. Every regex over parameter names lives here; other modules ask these
functions or use these patterns.

A new additive kind adds its prefix to `ADDITIVE_PREFIXES` (and, if it can be folded into the
plain weights, its leaf pattern to `merge.py`'s use of the patterns below).
"""

from __future__ import annotations

import re

HEAD = "head"
ENCODER = "encoder"

# Module-name prefixes of the leaves created by additive hooks.
ADDITIVE_PREFIXES = ("lora_", "adapter", "ssf_", "vpt_")

# A leaf created by an additive hook: LoRA factors, adapter, SSF scale/shift, VPT prompts.
ADDITIVE_RE = r"(?:.*/)?(?:lora_[^/]+|adapter|ssf_[^/]+|vpt_prompts_\d+)(?:/.*)?"
# Pretrained encoder weights (no additive leaf).
BACKBONE_RE = r"encoder/(?!(?:.*/)?(?:lora_|adapter/|ssf_|vpt_prompts_)).*"
HEAD_RE = r"head/.*"
# Linear layers of the transformer blocks (SPT's selection scope) and their LoRA module names.
LINEAR_RE = re.compile(
    r"encoder/resblocks_(\d+)/(attn/(?:query|key|value|out)|mlp/(?:c_fc|c_proj))/kernel")
LORA_MODULE = {"attn/query": "attn/lora_query", "attn/key": "attn/lora_key",
               "attn/value": "attn/lora_value", "attn/out": "attn/lora_out",
               "mlp/c_fc": "mlp/lora_c_fc", "mlp/c_proj": "mlp/lora_c_proj"}

# Leaves the exporter folds into plain weights (merge.py) and those it cannot.
LORA_LEAF_RE = re.compile(r"(.*/)lora_([^/]+)/(a|b)")
SSF_LEAF_RE = re.compile(r"(.*/)?ssf_([^/]+)/(scale|shift)")
UNMERGEABLE_RE = re.compile(r"(?:.*/)?(adapter|vpt_prompts_\d+)(?:/.*)?")

_ADDITIVE = re.compile(ADDITIVE_RE)
_BACKBONE = re.compile(BACKBONE_RE)


def is_head(name: str) -> bool:
  return name == HEAD or name.startswith(HEAD + "/")


def is_additive(name: str) -> bool:
  return bool(_ADDITIVE.fullmatch(name))


def is_backbone(name: str) -> bool:
  """A pretrained encoder weight (not the head, not an additive leaf)."""
  return bool(_BACKBONE.fullmatch(name))


def has_additive_part(name: str) -> bool:
  """True when some '/'-part of the name starts with an additive prefix (convert.py's test)."""
  return any(part.startswith(ADDITIVE_PREFIXES) for part in name.split("/"))
