"""Checkpoint I/O: header-only opening, tensor-at-a-time reads, and a streaming sharded writer."""
