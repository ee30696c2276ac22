"""`python -m minisgl --model DIR [flags]`: the HTTP server, or `--shell` for a terminal chat.

Everything that can be wrong before a worker starts (flags, the model, the template, GPUs) is
checked here and reported as one line with exit status 2. Nothing heavy is imported before
the flags are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import NoReturn

from minisgl.args import ServerArgs


def _fail(message: str) -> NoReturn:
    print(f"python -m minisgl: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse(argv: list[str] | None) -> ServerArgs:
    """minisgl.args.parse_args, but a bad flag prints one line (no usage block) and exits 2."""
    from minisgl.args import parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args(argv)
    except SystemExit as e:
        if lines := err.getvalue().strip().splitlines():
            print(lines[-1], file=sys.stderr)
        raise SystemExit(e.code) from None
    local = len(args.local_ranks)
    if local > 1 and args.resolved_device == "cuda":
        import torch

        if local > (visible := torch.cuda.device_count()):
            per_node = " per node" if args.nnodes > 1 else ""
            _fail(f"--tp {args.tp} needs {local} GPUs{per_node}, {visible} visible")
    if args.chat_template and not os.path.isfile(args.chat_template):
        _fail(f"--chat-template {args.chat_template!r} is not a file")
    return _resolve_model(args)  # last: it may download the checkpoint


def _resolve_model(args: ServerArgs) -> ServerArgs:
    """A hub id is found in the cache (or downloaded) here, before any worker starts, so a
    model that cannot be had is one line, not a traceback in every worker. The workers then
    read the local snapshot; clients keep sending the id (the served model name)."""
    path = os.path.expanduser(args.model)
    if not (args.model.startswith((".", "/", "~")) or os.path.exists(path)):
        from minisgl.models.config import resolve_model_path

        try:
            path = resolve_model_path(args.model)
        except ValueError as e:
            _fail(str(e))
        args = args.replace(model=path, served_model_name=args.served_model_name or args.model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        _fail(f"--model {args.model!r} is not a model directory (no config.json there)")
    from minisgl.tokenizer import has_tokenizer

    if args.shell and not has_tokenizer(path):
        _fail(f"--shell needs a tokenizer, and {path} has none")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.shell:
        from minisgl.shell import run_shell

        return run_shell(args)
    from minisgl.server.launcher import run_node, run_server

    return run_node(args) if args.node_rank > 0 else run_server(args)


if __name__ == "__main__":
    sys.exit(main())
