"""The ``whymatch`` command: one subcommand per pipeline stage, each defined by the package that owns it."""

from __future__ import annotations

import click

from api.cli import COMMANDS as API_COMMANDS
from engine.cli import compare_command, eval_command, train_command
from indexer.cli import COMMANDS as INDEXER_COMMANDS
from whymatch.demo import demo_command
from whymatch.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """whymatch — image similarity search that says why two images match."""
    ctx.obj = Settings.from_environment()


for command in (demo_command, train_command, compare_command, eval_command, *INDEXER_COMMANDS, *API_COMMANDS):
    main.add_command(command)
