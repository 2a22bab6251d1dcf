"""firezone/proto is pure: no I/O, clock or randomness modules imported anywhere under it."""

import ast
from pathlib import Path

PROTO = Path(__file__).resolve().parents[2] / "firezone" / "proto"
BANNED = {"asyncio", "socket", "os", "time", "random", "secrets", "subprocess", "threading", "select",
          "selectors", "uvloop", "aiohttp", "pyroute2", "signal"}


def test_proto_imports_nothing_impure() -> None:
    offenders = []
    files = list(PROTO.rglob("*.py"))
    assert files, "firezone/proto has no modules"
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in BANNED:
                    offenders.append(f"{path.relative_to(PROTO.parent.parent)}:{node.lineno} imports {n}")
    assert not offenders, "\n".join(offenders)
