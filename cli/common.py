"""What every command shares: error handling, progress rendering, option parsing.

Nothing here imports torch: the library is imported inside each command, so ``--help`` stays fast.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Iterator, Optional

import typer

DEVICE_HELP = "Compute device: auto (CUDA when present), cpu, cuda or cuda:N."
DTYPE_HELP = "Output dtype of floating tensors (bf16, fp16, fp32, fp64); default: as the first input."
SHARD_HELP = "Largest output shard, e.g. 5GB, 200MB, 2GiB."
CONFIG_HELP = "Input (or folder) to copy config, generation config and tokenizer from; default: the first input."

# Options every writing command takes (one definition, so they read the same everywhere).
OUTPUT = typer.Option(..., "--output", "-o", help="Output folder (created only when complete).")
DEVICE = typer.Option("auto", help=DEVICE_HELP)
SHARD = typer.Option("5GB", help=SHARD_HELP)
FORCE = typer.Option(False, "--force", help="Replace an existing output folder.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Accept pickled .bin inputs (weights_only load).")
PUSH_TO = typer.Option(None, "--push-to", metavar="ORG/NAME",
                       help="Then push the output to this Hub repo, as `surgery push` does (token: HF_TOKEN or the hub login).")
CONTENT_HASH = typer.Option(False, "--content-hash",
                            help="Record every input's content hash (sha256 of each tensor's bytes) in the model card: "
                                 "one more hash pass over the inputs, on the read-ahead threads.")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the library's errors into one line on stderr and a non-zero exit."""
    from surgery.errors import SurgeryError

    try:
        yield
    except SurgeryError as e:
        fail(str(e).replace("\n", " "))
    except KeyboardInterrupt:
        fail("interrupted; no output was written", 130)


@contextlib.contextmanager
def resumable(folder, repo_id: str) -> Iterator[None]:
    """A push stopped by Ctrl-C says how to resume it (the output itself is complete)."""
    try:
        yield
    except KeyboardInterrupt:
        fail(f"interrupted; {folder} is complete: run `surgery push {folder} {repo_id}` to resume the push", 130)


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{what}: expected comma-separated numbers, got {text!r}")


@contextlib.contextmanager
def tensor_progress(label: str, quiet: bool = False):
    """A rich progress bar over tensors and bytes on a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("tensors"),
               DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(p):
            bar.update(task, total=p.bytes_total, completed=p.bytes_done,
                       description=f"{label} {p.tensors_done}/{p.tensors_total}")

        yield update


def writes_model(output: str = "output", content_hashes: bool = True):
    """Give a command that writes a model folder (its parameter ``output``) the options
    ``--push-to ORG/NAME`` and (with ``content_hashes``: outputs with a model card) ``--content-hash``.
    With ``--push-to`` the repo id and a token are checked before the command runs, and the output
    is pushed (``surgery.push``) once the command has written it, so only a complete output is ever
    pushed. One definition for every writing command."""

    def decorate(command):
        signature = inspect.signature(command)
        extra = [inspect.Parameter("push_to", inspect.Parameter.KEYWORD_ONLY, default=PUSH_TO, annotation=Optional[str])]
        if content_hashes:
            extra.append(inspect.Parameter("content_hash", inspect.Parameter.KEYWORD_ONLY, default=CONTENT_HASH,
                                           annotation=bool))

        @functools.wraps(command)
        def run(*args, push_to: Optional[str] = None, content_hash: bool = False, **kwargs):
            if push_to is not None:
                if kwargs.get("dry_run"):
                    fail("--push-to pushes the output; --dry-run writes none")
                if kwargs.get(output) is None:
                    fail(f"--push-to needs --{output.replace('_', '-')}")
                with reported_errors():
                    from surgery.hub import check_push

                    check_push(push_to)  # before hours of work, not after
            if content_hash:
                from surgery.recipes.run import content_hashing

                with content_hashing():
                    command(*args, **kwargs)
            else:
                command(*args, **kwargs)
            if push_to is not None:
                quiet = kwargs.get("quiet", False)
                with reported_errors(), resumable(kwargs[output], push_to):
                    import surgery

                    result = surgery.push(kwargs[output], push_to, log=None if quiet else lambda m: typer.echo(m, err=True))
                typer.echo(f"pushed {kwargs[output]} to {push_to} ({result.revision}): "
                           f"{len(result.uploaded)} file(s) in {len(result.commits)} commit(s)")

        run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        run.__annotations__ = {**getattr(command, "__annotations__", {}), "push_to": Optional[str],
                               **({"content_hash": bool} if content_hashes else {})}
        return run

    return decorate


PRINT_RECIPE = typer.Option(False, "--print-recipe",
                            help="Print the equivalent one-step recipe (YAML for `surgery run`) and exit without computing.")


def prints_recipe(to_step, output: str = "output"):
    """Give a writing command the option ``--print-recipe``: ``to_step(kwargs)`` maps the command's
    arguments to ``(op, params)``, and the one-step recipe that replays the command is printed
    instead of running it (``surgery run`` of it writes the same bytes). One definition for every
    writing command (``output``: its parameter naming the model folder); apply it above ``@writes_model()``."""

    def decorate(command):
        signature = inspect.signature(command)
        extra = inspect.Parameter("print_recipe", inspect.Parameter.KEYWORD_ONLY, default=PRINT_RECIPE,
                                  annotation=bool)

        @functools.wraps(command)
        def run(*args, print_recipe: bool = False, **kwargs):
            if not print_recipe:
                return command(*args, **kwargs)
            if kwargs.get("push_to") is not None:
                fail("--print-recipe writes nothing; --push-to has nothing to push")
            if kwargs.get("dry_run"):
                fail("--print-recipe prints a recipe that writes a model; drop --dry-run")
            op, params = to_step(kwargs)
            with reported_errors():
                from surgery.recipes.graph import one_step_recipe, recipe_yaml

                recipe = one_step_recipe(op, params, kwargs.get(output), dtype=kwargs.get("dtype"),
                                         max_shard_size=kwargs.get("max_shard_size"))
                typer.echo(recipe_yaml(recipe), nl=False)

        run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
        run.__annotations__ = {**getattr(command, "__annotations__", {}), "print_recipe": bool}
        return run

    return decorate
