"""The typer front end of surgery. Installed as ``surgery_cli``; every command wraps one library call."""
