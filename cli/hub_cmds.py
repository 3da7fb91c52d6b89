"""``surgery push``: a finished output folder (or single-file output) to a Hub repo, in several commits, resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import reported_errors, resumable


def push(
    folder: Path = typer.Argument(..., metavar="PATH", help="A complete checkpoint folder (what a surgery command wrote), or an SFT or mask file."),
    repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="The Hub repo (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if missing); default main."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request against the default branch instead."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit title (parts get ' (part i of n)')."),
    commit_size: str = typer.Option("5GB", "--commit-size", help="Weights per commit, e.g. 5GB: a rerun resumes after the last one."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
) -> None:
    """Push PATH to the Hub repo ORG/NAME; rerun the same command to resume an interrupted push."""
    with reported_errors(), resumable(folder, repo_id):
        import surgery

        result = surgery.push(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                              commit_message=commit_message, commit_size=commit_size,
                              log=None if quiet else lambda m: typer.echo(m, err=True))
    where = result.pr_url or f"{result.url} ({result.revision})"
    typer.echo(f"pushed {folder} to {where}: {len(result.uploaded)} file(s) in {len(result.commits)} commit(s)"
               + (f", {len(result.skipped)} already there" if result.skipped else ""))
