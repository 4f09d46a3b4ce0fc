"""Fixtures the hostile tests share with other folders: the flow environment of tests/flows."""

from tests.flows.conftest import make_env  # noqa: F401 (a fixture: registered by importing it)
