"""`python -m server [--workspace DIR]`: serve MCP over stdio. Nothing but protocol on stdout."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m server", description="llm-fine-tuning MCP server (stdio)")
    ap.add_argument("--workspace", default=os.environ.get("LLM_FT_WORKSPACE") or os.getcwd(),
                    help="directory that every tool path resolves inside (default: the cwd)")
    ap.add_argument("--allow-endpoint", action="append", default=[], metavar="HOST",
                    help="a non-loopback host that evaluate(base_url=...) may call (repeatable); "
                         "link-local/metadata addresses are refused always")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    # Logs go to stderr; stdout belongs to the protocol.
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tools.endpoints import allowed_hosts, set_allowed_hosts
    from tools.workspace import set_workspace
    set_workspace(args.workspace)
    set_allowed_hosts([*allowed_hosts(), *args.allow_endpoint])
    from server.app import create_server
    create_server().run("stdio")


if __name__ == "__main__":
    main()
