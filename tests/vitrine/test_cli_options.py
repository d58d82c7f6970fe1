"""The CLI refuses a malformed option before it touches anything (no broker runs here)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vitrine.cli import main as cli


@pytest.mark.parametrize("router", ["vitrine-router", "ftp://vitrine-router", "http://", ""])
@pytest.mark.parametrize("command", [["promote", "some-model"], ["rollback"], ["status"]])
def test_a_malformed_router_url_is_refused_up_front(command: list[str], router: str) -> None:
    result = CliRunner().invoke(cli.app, ["model", *command, "--cluster", "--router", router],
                                env={"VITRINE_KAFKA_BOOTSTRAP": "127.0.0.1:1", "COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "is not an http(s)://host[:port] URL" in result.output
