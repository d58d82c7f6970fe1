"""`vitrine up` restarts a child that dies, with backoff, as Kubernetes would."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers import eventually, http_json
from vitrine.cli.stack import LocalStack, StackSettings, Supervisor
from vitrine.cli.status import probe


def test_backoff_doubles_and_a_deliberate_stop_is_left_alone(tmp_path: Path) -> None:
    stack = LocalStack(StackSettings(state_dir=tmp_path))
    stack.log_dir.mkdir(parents=True)
    stack._add("crasher", ["sh", "-c", "exit 3"], {}, None)
    supervisor = Supervisor(stack, base_delay_s=1.0, max_delay_s=3.0)
    child = stack.children["crasher"]
    stack.start_child("crasher", wait=False)
    assert child.process is not None
    child.process.wait()

    supervisor.check("crasher", now=100.0)  # noticed: restart scheduled after 1 s
    assert child.restart_at == 101.0 and supervisor.restarts == {}
    supervisor.check("crasher", now=100.5)
    assert supervisor.restarts == {}
    supervisor.check("crasher", now=101.0)
    assert supervisor.restarts == {"crasher": 1}
    child.process.wait()
    supervisor.check("crasher", now=200.0)
    assert child.restart_at == 202.0  # second early death: 2 s
    supervisor.check("crasher", now=202.0)
    child.process.wait()
    supervisor.check("crasher", now=300.0)
    assert child.restart_at == 303.0  # capped at max_delay_s

    stack.stop_child("crasher")
    supervisor.check("crasher", now=400.0)
    assert supervisor.restarts == {"crasher": 2}  # not wanted: left alone


@pytest.mark.stack
def test_a_killed_shard_is_restarted_and_serves_again(stack: LocalStack) -> None:
    if stack._supervisor is None:
        stack.supervise(base_delay_s=0.2)
    process = stack.children["shard-1"].process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    eventually(
        lambda: stack.children["shard-1"].process is not process
        and probe(f"{stack.shard_urls[1]}/readyz")[0] == 200,
        what="shard-1 restarted and ready",
    )
    assert stack._supervisor is not None and stack._supervisor.restarts["shard-1"] >= 1
    status, answer = http_json(f"{stack.router_url}/search?q=shirt&k=3")
    assert status == 200 and not answer["partial"]
