"""The `python -m dspark.<module>` entry point shared by the subcommand modules (pretrain, datagen,
train-drafter, eval, bench): parse the module's arguments, run it, and report bad input in one line.

    def main(argv: list[str] | None = None) -> int:
        return module_main(argv, prog="dspark datagen", description=__doc__, add_arguments=add_arguments,
                           run=run, label="dspark datagen: error")

`dspark.cli` builds the same parsers as subcommands; this keeps each module runnable on its own
(torchrun needs a module) without every module repeating the parser and error plumbing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dspark.errors import DSparkError


def module_main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    label: str = "error",
    errors: tuple[type[BaseException], ...] = (DSparkError, ValueError, FileNotFoundError),
) -> int:
    """Parse `argv` (default sys.argv[1:]), call `run(args)` and return its status (None = 0).

    An exception of a type in `errors` is bad input: printed as `{label}: {message}` on stderr, exit
    status 2, never a traceback."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args) or 0
    except errors as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{prog}: {e or 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_status", 130))  # 130 after Ctrl-C; a trainer stopped by SIGTERM: 143
