from tests.cli.conftest import served_portal  # noqa: F401  (shared fixture: a real `fz portal serve`)
