"""The plan (plain data) and the streaming executor that runs it."""
