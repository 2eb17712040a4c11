"""The root `cai` command: global options, exit-code mapping and helpers shared by subcommands.
Heavy libraries are imported inside command bodies so `cai --help` starts instantly."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from cai.config import Settings
    from cai.workspace import Workspace

out = Console()
err = Console(stderr=True)

DATABASE_SOURCE = "--db / CAI_DATABASE_URL"
"""Where the CLI's database URL comes from, named in errors about it."""

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class CaiGroup(TyperGroup):
    """Maps errors to the documented exit codes: 2 for bad input (with every problem listed),
    1 for anything else (traceback only with CAI_DEBUG=1)."""

    def invoke(self, ctx: Any) -> Any:
        from cai.errors import BadInput

        try:
            return super().invoke(ctx)
        except BadInput as exc:
            for line in exc.problems:
                err.print(f"[red]error:[/red] {escape(line)}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0] in ("typer", "click"):
                raise  # usage errors, --help, explicit exits: typer already knows what to do
            if os.environ.get("CAI_DEBUG"):
                raise
            # escape: messages quote paths and log prefixes like "[/path/pair.cc:553]" that rich
            # would otherwise read as markup and fail on.
            err.print(
                f"[red]failed:[/red] {type(exc).__name__}: {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            err.print("(set CAI_DEBUG=1 for the traceback)", style="dim")
            raise typer.Exit(EXIT_FAILURE) from None


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(
        cls=CaiGroup,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )


def workspace(ctx: typer.Context) -> Workspace:
    """The process's workspace (settings, one engine, backend factories), made by the root command."""
    root = ctx.find_root()
    if root.obj is None:
        from cai.workspace import Workspace

        root.obj = Workspace(database_source=DATABASE_SOURCE)
    workspace_: Workspace = root.obj
    return workspace_


def settings(ctx: typer.Context) -> Settings:
    return workspace(ctx).settings


@contextmanager
def transaction(ctx: typer.Context) -> Iterator[Session]:
    """One transaction for a whole command: bad input rolls everything back."""
    with workspace(ctx).session() as session:
        yield session


class RichProgress:
    """Stage progress (cai.stages.progress) drawn as rich bars on stderr, so --json output stays
    clean; a new task completes the previous bar. Never asks a stage to stop (Ctrl-C does)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bars = Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            "{task.fields[info]}",
            console=err,
        )
        self.current: Any = None

    def __enter__(self) -> RichProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def task(self, label: str, total: int | None = None) -> None:
        self.current = self.bars.add_task(label, total=total, info="")

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        if self.current is None:
            self.task("working")
        fields: dict[str, Any] = {"completed": done, "info": info}
        if total is not None:
            fields["total"] = total
        self.bars.update(self.current, **fields)

    def note(self, message: str) -> None:
        self.bars.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def stop_requested(self) -> bool:
        return False


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n")


JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def quiet_libraries() -> None:
    """cai shows one progress bar per stage; the libraries' own bars (tokenizing, loading and
    writing weights) and a deprecation warning transformers raises from its own code would
    bury it."""
    import os
    import warnings

    import datasets
    import transformers

    # TRL's bar over the reference log-probs (precompute_ref_log_probs) reads only this variable.
    os.environ["TQDM_DISABLE"] = "1"
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
