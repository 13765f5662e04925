"""``python -m train --config configs/<name>.py[:variant] --workdir DIR [--config.field=value ...]``."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import distributed
from train.train import NonFiniteError, WorkdirStateError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the exported adapter.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/TFDS INFO lines would drown the progress output
  distributed.initialize(_CONFIG.value)
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (NonFiniteError, WorkdirStateError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if result["preempted"]:
    print(f"preempted: checkpoint saved at step {result['steps']}; rerun the same command to resume.", file=sys.stderr)
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
