"""fz: a zero-trust network access system built after Firezone's design."""

__version__ = "0.1.0"
