"""The runtime tests use the flow fixtures (a daemon hosting the counter component)."""

from tests.flows.conftest import env, make_env

__all__ = ["env", "make_env"]

import os
import subprocess
import uuid

import pytest


@pytest.fixture
def amqp_url() -> str:  # TEMPORARY (dev): replaced by tests/broker.py
    base = os.environ["DEPLOYD_DEV_AMQP"]
    vhost = "v" + uuid.uuid4().hex[:8]
    env = dict(
        os.environ, RABBITMQ_NODENAME="deployddev@localhost", ERL_EPMD_PORT="35674", HOME="/tmp/rmq"
    )
    subprocess.run(
        ["/usr/lib/rabbitmq/bin/rabbitmqctl", "add_vhost", vhost],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "/usr/lib/rabbitmq/bin/rabbitmqctl",
            "set_permissions",
            "-p",
            vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return f"{base}/{vhost}"
