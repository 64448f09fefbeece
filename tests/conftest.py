"""Fixtures shared by test modules."""

from helpers_timing import fake_timing  # noqa: F401 (a fixture: whole models timed by their size)
