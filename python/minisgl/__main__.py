"""`python -m minisgl --model DIR [flags]`: the HTTP server, or `--shell` for a terminal chat."""

from __future__ import annotations

import contextlib
import io
import os
import sys

from minisgl.args import ServerArgs


def _parse(argv: list[str] | None) -> ServerArgs:
    """minisgl.args.parse_args, but a bad flag prints one line (no usage block) and exits 2."""
    from minisgl.args import parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args(argv)
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines()
        if lines:
            print(lines[-1], file=sys.stderr)
        raise SystemExit(e.code) from None
    local = args.model.startswith((".", "/", "~")) or os.path.exists(args.model)
    if local and not os.path.isfile(os.path.join(os.path.expanduser(args.model), "config.json")):
        print(
            f"python -m minisgl: error: --model {args.model!r} is not a model directory "
            "(no config.json there)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    local = len(args.local_ranks)
    if local > 1 and args.resolved_device == "cuda":
        import torch

        if local > torch.cuda.device_count():
            print(
                f"python -m minisgl: error: --tp {args.tp} needs {local} GPUs"
                f"{' per node' if args.nnodes > 1 else ''}, "
                f"{torch.cuda.device_count()} visible",
                file=sys.stderr,
            )
            raise SystemExit(2)
    if args.chat_template and not os.path.isfile(args.chat_template):
        print(
            f"python -m minisgl: error: --chat-template {args.chat_template!r} is not a file",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.shell:
        from minisgl.shell import run_shell

        return int(run_shell(args) or 0)
    if args.node_rank > 0:
        from minisgl.server.node import run_node

        return run_node(args)
    from minisgl.server.launcher import run_server

    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
