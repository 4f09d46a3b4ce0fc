"""The runtime tests use the flow fixtures (a daemon hosting the counter component)."""

from tests.flows.conftest import env, make_env

__all__ = ["env", "make_env"]
