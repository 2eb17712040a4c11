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
    from rich.progress import Progress
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from cai.config import Settings

out = Console()
err = Console(stderr=True)

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


def settings(ctx: typer.Context) -> Settings:
    root = ctx.find_root()
    if root.obj is None:
        from cai.config import load_settings

        root.obj = load_settings()
    return root.obj


def engine(ctx: typer.Context) -> Engine:
    """The store's engine, upgraded to the current schema on first use."""
    from cai.store.db import ensure_schema, make_engine

    store = make_engine(settings(ctx).database_url)
    ensure_schema(store)
    return store


@contextmanager
def transaction(ctx: typer.Context) -> Iterator[Session]:
    """One transaction for a whole command: bad input rolls everything back."""
    from cai.store.db import session_scope

    with session_scope(engine(ctx)) as session:
        yield session


def progress_bar(*extra_columns: str) -> Progress:
    """The progress display every long command uses (on stderr, so --json output stays clean)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, *extra_columns, console=err)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n")


JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def quiet_libraries() -> None:
    """cai shows one progress bar per stage; the libraries' own bars (tokenizing, loading and
    writing weights) and a deprecation warning transformers raises from its own code would
    bury it."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
