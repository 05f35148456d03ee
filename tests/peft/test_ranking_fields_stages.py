"""peft.l2_reduction / peft.selection_scope as stage inputs: recorded only when not at their default,
so that workdirs made before the fields existed keep their fingerprints."""

from train_fixtures import make_tiny_config

from shpeft_jax import stages


def _fingerprints(tmp_path, **peft):
  c = make_tiny_config()
  for k, v in peft.items():
    c.peft[k] = v
  return {n: s.fingerprint for n, s in
          stages.trainer_stages(c, str(tmp_path), source_id="digits:x", init_id="i0").items()}


def test_defaults_keep_old_fingerprints(tmp_path):
  """A config without the two fields (as before they existed) == one with their defaults."""
  old = make_tiny_config()
  with old.peft.unlocked():
    del old.peft["l2_reduction"]
    del old.peft["selection_scope"]
  before = {n: s.fingerprint for n, s in
            stages.trainer_stages(old, str(tmp_path), source_id="digits:x", init_id="i0").items()}
  assert _fingerprints(tmp_path) == before
  assert _fingerprints(tmp_path, l2_reduction="sum_of_squares", selection_scope="global") == before


def test_non_default_values_change_the_stages_they_feed(tmp_path):
  base = _fingerprints(tmp_path)
  def changed(**peft):
    new = _fingerprints(tmp_path, **peft)
    return [n for n in stages.STAGES if n in new and new[n] != base[n]]
  # The L2 reading changes the scores; the scope only what is selected from them.
  assert changed(l2_reduction="square_of_sum") == ["scores", "mask", "train", "export"]
  assert changed(selection_scope="per_row") == ["mask", "train", "export"]
  assert changed(selection_scope="per_tensor") == ["mask", "train", "export"]


def test_sweep_presets_carry_the_fields_to_the_runs():
  from shpeft_jax import sweep  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import methods  # pylint: disable=g-import-not-at-top
  got = sweep.build_variants([], ["scope", "l2_reading"])
  assert [v.key for v in got] == ["shpeft", "random", "shpeft_per_tensor", "random_per_tensor",
                                  "shpeft_per_row", "random_per_row", "hybrid_l2",
                                  "hybrid_l2_sqsum"]
  base = make_tiny_config()
  resolved = {v.key: methods.validate_peft(sweep.variant_config(base, v).peft) for v in got}
  assert {k: (m.name, m.scope) for k, m in resolved.items() if "per_" in k} == {
      "shpeft_per_tensor": ("shpeft", "per_tensor"), "random_per_tensor": ("random", "per_tensor"),
      "shpeft_per_row": ("shpeft", "per_row"), "random_per_row": ("random", "per_row")}
  assert resolved["hybrid_l2_sqsum"].importance["l2_reduction"] == "square_of_sum"
  # The default reading's row is the same run as SH-PEFT's default.
  assert resolved["hybrid_l2"].importance == resolved["shpeft"].importance
