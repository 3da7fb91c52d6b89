"""Recipes turn a user's request into a plan and run it. Each public function is one CLI command."""
