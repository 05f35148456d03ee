"""The pure-PyTorch `apply_adapter` of docs/ADAPTERS.md, run as it stands in the doc."""

import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from shpeft_jax import adapter  # noqa: E402
from shpeft_jax.models import clip_vit, convert  # noqa: E402
from shpeft_jax.models import torch_reference as tr  # noqa: E402

from test_adapter import META, tiny_base_and_tuned  # noqa: E402  pylint: disable=g-bad-import-order

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "ADAPTERS.md")


def _doc_apply_adapter():
  blocks = re.findall(r"```python\n(.*?)```", open(DOC).read(), re.S)
  code = [b for b in blocks if "def apply_adapter(" in b]
  assert len(code) == 1, "docs/ADAPTERS.md must hold exactly one apply_adapter block"
  assert len(code[0].strip().splitlines()) <= 30
  namespace = {}
  exec(compile(code[0], DOC, "exec"), namespace)  # pylint: disable=exec-used
  return namespace["apply_adapter"]


def test_doc_apply_adapter_gives_the_flax_classifier(tmp_path):
  apply_adapter = _doc_apply_adapter()
  base, tuned = tiny_base_and_tuned()
  tuned = jax.tree.map(np.nan_to_num, tuned)  # NaN logits would compare equal to anything.
  adapter.write_adapter(str(tmp_path / "a"), tuned, base, base_name="tiny-base", meta=META)
  base_sd = {k: torch.from_numpy(v) for k, v in
             convert.flax_to_torch_state_dict(base, "openai").items()}
  sd = apply_adapter(base_sd, str(tmp_path / "a"))

  # The tensors are the fine-tuned ones bit for bit, and the base dict is left untouched.
  want = convert.flax_to_torch_state_dict(tuned, "openai")
  assert sorted(sd) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k].numpy().view(np.uint32), v.view(np.uint32), err_msg=k)
  for k, v in convert.flax_to_torch_state_dict(base, "openai").items():
    np.testing.assert_array_equal(base_sd[k].numpy(), v, err_msg=k)

  net = tr.TorchClipClassifier.from_config(clip_vit.get_model_config("test_tiny"), 3)
  net.load_state_dict(sd, strict=True)
  images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    got = net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  flax_logits = jax.jit(clip_vit.build_model("test_tiny", 3).apply)({"params": tuned}, images)
  np.testing.assert_allclose(got, np.asarray(flax_logits), atol=1e-5, rtol=0)

  # Another base is refused, naming the adapter's base.
  base_sd["ln_post.weight"] = base_sd["ln_post.weight"] + 1e-3
  with pytest.raises(ValueError, match="Wrong base.*tiny-base"):
    apply_adapter(base_sd, str(tmp_path / "a"))
