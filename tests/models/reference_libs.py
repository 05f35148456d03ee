"""open_clip and timm for the reference tests, importable beside a CPU-only torch.

Why this module exists: open_clip_torch and timm import torchvision at module level (transforms,
`torchvision.ops.misc.FrozenBatchNorm2d`, datasets), but the classes the tests build from them -
open_clip's `VisionTransformer` / `TimmModel` and timm's `VisionTransformer` - never call
torchvision. PyPI's torchvision wheels are built against one exact torch; next to the CPU torch
2.13 of this project's test environment it fails at import ("operator torchvision::nms does not
exist"), and `pip install open_clip_torch timm` would pull a CUDA torchvision (and torch) over the
CPU one. So the test install is `pip install --no-deps open_clip_torch timm` (README).

Two things happen here, only when `import torchvision` fails (a working torchvision is used as is):
  * `hide_broken_torchvision()` (run by tests/models/conftest.py before any test module imports
    transformers) maps `torchvision` to None in sys.modules, so that transformers sees it as not
    installed instead of importing a broken one (transformers 5 imports torchvision from
    `modeling_utils` whenever it looks installed).
  * `import_reference()` imports open_clip / timm with a stand-in `torchvision` in sys.modules that
    provides just the names they import while being imported, then hides torchvision again. Each
    stand-in raises if it is ever instantiated, so no test can pass on top of a fake transform.

Use: `open_clip, timm = reference_libs.require()` inside a test (skips with the reason when a
library is not installed).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest

# Module -> names that open_clip 3.3 and timm 1.0 import from it at import time.
_STUB_NAMES = {
    "torchvision": ("transforms", "datasets", "ops"),
    "torchvision.transforms": (
        "Normalize", "Compose", "RandomResizedCrop", "InterpolationMode", "ToTensor", "Resize",
        "CenterCrop", "ColorJitter", "Grayscale", "RandomCrop", "RandomHorizontalFlip",
        "RandomApply", "RandomGrayscale", "GaussianBlur", "Lambda", "functional"),
    "torchvision.transforms.functional": ("InterpolationMode",),
    "torchvision.datasets": ("CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST",
                             "ImageFolder"),
    "torchvision.ops": ("misc",),
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
}


class _Unavailable:
  """Stand-in class: importable, subclassable, usable in isinstance; fails when instantiated."""
  _name = "torchvision"

  def __init__(self, *args, **kwargs):
    raise RuntimeError(f"{self._name} is a test stub (torchvision cannot load beside this CPU "
                       f"torch); the reference tests must not use it.")


class _EnumLike(type):
  """`InterpolationMode.BICUBIC` etc. are read at import time as default argument values."""

  def __getattr__(cls, item):
    if item.startswith("__"):
      raise AttributeError(item)
    return f"{cls.__name__}.{item}"


def _stub_module(name: str) -> types.ModuleType:
  mod = types.ModuleType(name)
  mod.__file__ = f"<test stub {name}>"
  mod.__path__ = []  # a package, so submodule imports resolve through sys.modules
  mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
  return mod


def _drop_torchvision_modules() -> None:
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]


@contextlib.contextmanager
def _torchvision_stub():
  """The stand-in torchvision in sys.modules for the duration of the block, hidden afterwards."""
  _drop_torchvision_modules()
  modules = {name: _stub_module(name) for name in _STUB_NAMES}
  for name, attrs in _STUB_NAMES.items():
    mod = modules[name]
    for attr in attrs:
      sub = f"{name}.{attr}"
      if sub in modules:
        value = modules[sub]
      elif attr == "InterpolationMode":
        value = _EnumLike("InterpolationMode", (), {})
      else:
        value = type(attr, (_Unavailable,), {"_name": f"{name}.{attr}"})
      setattr(mod, attr, value)
  # Both import paths of InterpolationMode must be the same object.
  modules["torchvision.transforms.functional"].InterpolationMode = (
      modules["torchvision.transforms"].InterpolationMode)
  sys.modules.update(modules)
  try:
    yield
  finally:
    _drop_torchvision_modules()
    sys.modules["torchvision"] = None


def hide_broken_torchvision() -> bool:
  """Maps an unimportable torchvision to None in sys.modules; True if it did (or had done) so."""
  if "torchvision" in sys.modules and sys.modules["torchvision"] is None:
    return True
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    return False
  except Exception:  # pylint: disable=broad-except  (RuntimeError from the op registry, ImportError)
    pass
  _drop_torchvision_modules()  # leftovers of the failed import
  sys.modules["torchvision"] = None  # importlib.util.find_spec now answers None
  import_utils = sys.modules.get("transformers.utils.import_utils")
  if import_utils is not None:  # imported already: forget its cached answer
    import_utils.is_torchvision_available.cache_clear()
  return True


def import_reference(name: str):
  """open_clip or timm, or pytest.skip saying why it cannot be imported."""
  pytest.importorskip("torch")
  if sys.modules.get(name) is not None:
    return sys.modules[name]
  if importlib.util.find_spec(name) is None:
    pytest.skip(f"{name} is not installed; install the test dependencies with "
                f"`pip install --no-deps open_clip_torch==3.3.0 timm==1.0.31` (see README).")
  if not hide_broken_torchvision():
    return importlib.import_module(name)
  with contextlib.suppress(ImportError):
    importlib.import_module("transformers")  # open_clip imports it; let it see no torchvision
  with _torchvision_stub():
    return importlib.import_module(name)


def require():
  """(open_clip, timm) for a test; skips where either is missing."""
  return import_reference("open_clip"), import_reference("timm")
