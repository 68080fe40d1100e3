"""Structured Streaming plumbing: the configured sources, and running a query until it is told to stop."""
