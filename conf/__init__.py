"""The Hydra configs, installed as ``das_lightning.conf`` (see pyproject.toml) so that the Python API composes
them without a source checkout. Only the YAML files here are configuration."""
