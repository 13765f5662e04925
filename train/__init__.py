"""The training job: `python -m train --config configs/<name>.py --workdir DIR`."""
