"""Compiled samplers: the whole recursive generation as one jitted program."""
