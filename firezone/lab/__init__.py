"""The network-namespace lab used by ``fz lab`` and the end-to-end tests (see :mod:`.lab`)."""

from firezone.lab.lab import (
    DEFAULT_STATE_ROOT,
    LAB_NAT_CHOICES,
    LOG,
    Lab,
    LabError,
    LabExecError,
    check_prerequisites,
    router_ruleset,
)

__all__ = [
    "DEFAULT_STATE_ROOT",
    "LAB_NAT_CHOICES",
    "LOG",
    "Lab",
    "LabError",
    "LabExecError",
    "check_prerequisites",
    "router_ruleset",
]
