"""The ``surgery`` command."""
from __future__ import annotations

import typer

from . import hub_cmds, inspect_cmd, lora_cmds, run_cmd, soup_cmd, sparse_cmds, spectral_cmd, task_vector_cmds, verify_cmd

# Plain help text: rich-rendered help costs a quarter second of imports on every --help.
app = typer.Typer(name="surgery", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Weight-space model surgery: soups, task vectors, transfer and more, streamed tensor by tensor.")
app.command("soup")(soup_cmd.soup)
app.command("inspect")(inspect_cmd.inspect)
app.command("diff")(task_vector_cmds.diff)
app.command("transfer")(task_vector_cmds.transfer)
app.command("merge")(task_vector_cmds.merge)
app.command("lines")(task_vector_cmds.lines)
app.command("graft")(sparse_cmds.graft)
app.add_typer(sparse_cmds.mask_app, name="mask")
app.add_typer(sparse_cmds.sft_app, name="sft")
app.command("spectral")(spectral_cmd.spectral)
app.add_typer(lora_cmds.lora_app, name="lora")
app.command("push")(hub_cmds.push)
app.command("run")(run_cmd.run)
app.command("verify")(verify_cmd.verify)


def _print_version(value: bool) -> None:
    if value:
        from surgery import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    pass


def main() -> None:
    import sys

    import surgery.card

    surgery.card.COMMAND = ["surgery", *sys.argv[1:]]  # recorded in model cards as run, paths as given
    app()
