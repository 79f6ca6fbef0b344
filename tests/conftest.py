"""Suite-wide settings. Loaded by pytest before any test module imports torch."""

import os

# Idle OpenMP threads sleep instead of spinning (see star/cli.py): the suite starts several
# torch processes at once (DeepSpeed ranks, SLURM tasks) on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
