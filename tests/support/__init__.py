"""Test harnesses shared by several test modules: stand-ins, fixtures and a SLURM cluster helper."""
