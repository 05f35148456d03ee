"""Build a dataset's tfds files once, before training (multi-host: run it on one machine).

  python -m shpeft_jax.data.prepare --name busi --data_dir ~/tfds --manual_dir ~/downloads/busi
  python -m shpeft_jax.data.prepare --config configs/chexpert.py --data_dir ~/tfds \\
      --manual_dir ~/downloads/chexpert --set data.chexpert_uncertainty=ignore

Training reads the prepared files; the input pipeline would also prepare on first use (one
process at a time per dataset: others wait for it). Sources with options (csv, chexpert,
medmnist, ...) take them from the config file's `data` section and `--set data.field=value`.
"""

from __future__ import annotations

import argparse
import json

from shpeft_jax.data import DATASET_NAMES, default_data_config
from shpeft_jax.errors import ConfigError, cli_main, exit_process


def _data_config(args):
  if args.config:
    from shpeft_jax.analysis.__main__ import load_config  # pylint: disable=g-import-not-at-top
    config = load_config(args.config, args.set or ()).data
  else:
    if args.set:
      raise ConfigError("--set needs --config (the config file whose fields it sets).")
    config = default_data_config()
  if args.name:
    config.name = args.name
  if config.name == "digits":
    raise ConfigError("--name: the digits demo data lives in memory and needs no preparing; "
                      f"choose one of {[n for n in DATASET_NAMES if n != 'digits']}.")
  config.data_dir, config.manual_dir = args.data_dir, args.manual_dir
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", choices=[n for n in DATASET_NAMES if n != "digits"],
                      help="the dataset (default: the --config file's data.name)")
  parser.add_argument("--config", help="a config file (path.py or path.py:arg) whose data "
                      "section holds the source's options, e.g. configs/medmnist.py:pathmnist_224")
  parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="config override, e.g. --set data.val_fraction=0.2 (repeatable)")
  parser.add_argument("--data_dir", required=True, help="tfds data directory to write")
  parser.add_argument("--manual_dir", required=True,
                      help="the downloaded dataset in its published layout (docs/DATASETS.md)")
  parser.add_argument("--verbosity", type=int, default=0, help="1: full tracebacks of errors")
  args = parser.parse_args(argv)
  if not args.name and not args.config:
    parser.error("give --name or --config")

  def run():
    config = _data_config(args)
    from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    info = input_pipeline.dataset_info(config)
    print(json.dumps({"name": info.name, "task": info.task,
                      "class_names": list(info.class_names), "split_sizes": info.split_sizes,
                      "source_id": info.source_id}))
  return cli_main(run, verbosity=args.verbosity, hint_path=args.data_dir)


if __name__ == "__main__":
  exit_process(main())
