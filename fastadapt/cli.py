"""Command-line interface: ``python -m fastadapt <command>``."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import fastadapt

    print(json.dumps(fastadapt.build_info(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what was built and whether it loaded").set_defaults(fn=_cmd_info)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
