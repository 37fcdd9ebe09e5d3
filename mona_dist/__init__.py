"""mona-dist: distributed parameter-efficient tuning of large vision backbones."""

__version__ = "0.1.0"
