"""Build a dataset's tfds files once, before training (multi-host: run it on one machine).

  python -m shpeft_jax.data.prepare --name busi --data_dir ~/tfds --manual_dir ~/downloads/busi

Training reads the prepared files; the input pipeline would also prepare on first use, but several
processes must not write the same data_dir at once.
"""

from __future__ import annotations

import argparse
import json

from shpeft_jax.data import DATASET_NAMES, default_data_config
from shpeft_jax.errors import cli_main, exit_process


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", required=True, choices=[n for n in DATASET_NAMES if n != "digits"])
  parser.add_argument("--data_dir", required=True, help="tfds data directory to write")
  parser.add_argument("--manual_dir", required=True,
                      help="the downloaded dataset in its published layout (docs/DATASETS.md)")
  parser.add_argument("--verbosity", type=int, default=0, help="1: full tracebacks of errors")
  args = parser.parse_args(argv)

  def run():
    from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    config = default_data_config()
    config.name, config.data_dir, config.manual_dir = args.name, args.data_dir, args.manual_dir
    info = input_pipeline.dataset_info(config)
    print(json.dumps({"name": info.name, "class_names": list(info.class_names),
                      "split_sizes": info.split_sizes, "source_id": info.source_id}))
  return cli_main(run, verbosity=args.verbosity, hint_path=args.data_dir)


if __name__ == "__main__":
  exit_process(main())
