"""Processes and files of this host."""
