"""The one exception type for bad input (exit code 2), importable from every layer.

``star.config`` re-exports it; the low layers (``star.ops``, ``pipelines``, ``data_prep``)
import it from here so that they never import the config module (which imports the models).
"""


class ConfigError(ValueError):
    """Bad input: a config that cannot be resolved (unknown key, wrong type, missing preset, ...),
    a corrupt sample, a damaged manifest, an unusable checkpoint. Commands print it as one line
    and exit with code 2."""
