"""``whymatch serve``: the REST API and the web page, with uvicorn."""

from __future__ import annotations

import os
import secrets

import click
from pydantic import SecretStr

from engine.errors import WeightsNotInstalledError

TOKEN_BYTES = 24


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--quiet", is_flag=True, help="No access log, only warnings and errors (for scripts and tests).")
@click.pass_context
def serve_command(ctx: click.Context, host: str, port: int, log_level: str, quiet: bool) -> None:
    """Serve the REST API under /api (docs at /docs) and the web page at /.

    Writes need WHYMATCH_API_TOKEN as a bearer token; when it is unset a random token is generated for
    this run and printed (with a link that hands it to the page). WHYMATCH_API_READ_TOKEN protects reads.
    """
    import torch
    import uvicorn

    from api.app import create_app, log  # defers FastAPI, torch and FAISS: `whymatch --help` stays instant
    from indexer import Catalogue  # defers torch and FAISS

    settings, model_settings = ctx.obj.api, ctx.obj.model
    generated = settings.api_token is None
    if generated:
        settings = settings.model_copy(update={"api_token": SecretStr(secrets.token_urlsafe(TOKEN_BYTES))})
    if model_settings.threads > 0:
        torch.set_num_threads(model_settings.threads)
    else:
        # api_workers requests run the network at once; more torch threads than cores in total only thrash.
        torch.set_num_threads(max(1, _cpu_count() // settings.api_workers))
    try:
        app = create_app(settings, Catalogue.from_settings(ctx.obj.storage, model_settings, log=log.info))
    except (FileNotFoundError, WeightsNotInstalledError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}/"
    click.echo(f"whymatch: listening on http://{host}:{port}/ (API under /api, docs at /docs)", err=True)
    if generated:
        token = settings.api_token.get_secret_value()
        click.echo(f"whymatch: write token for this run (set WHYMATCH_API_TOKEN to choose one): {token}", err=True)
        click.echo(f"whymatch: open {url}#token={token}", err=True)
    else:
        click.echo(f"whymatch: open {url}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else log_level, access_log=not quiet)


COMMANDS = (serve_command,)
