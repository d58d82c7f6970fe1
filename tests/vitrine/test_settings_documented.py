"""Every setting a service or tool reads is in the README's settings tables: operators configure
Vitrine from the README, so a setting missing there is one nobody can find."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from services.encoder.settings import EncoderSettings
from services.router.settings import RouterSettings
from services.shard.settings import ShardSettings
from vitrine.cli.stack import StackSettings
from vitrine.settings import CommonSettings
from vitrine.training.train import TrainSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def environment_names(settings: type[BaseSettings]) -> list[str]:
    prefix = settings.model_config.get("env_prefix", "")
    return [f"{prefix}{field}".upper() for field in settings.model_fields]


@pytest.mark.parametrize(
    "settings",
    [CommonSettings, EncoderSettings, ShardSettings, RouterSettings, StackSettings, TrainSettings],
)
def test_every_setting_is_in_the_readme(settings: type[BaseSettings]) -> None:
    documented = set(re.findall(r"`(VITRINE_[A-Z0-9_]+)`", README.read_text()))
    names = environment_names(settings)
    assert names, "a settings class without fields"
    assert all(name.startswith("VITRINE_") for name in names)
    assert sorted(set(names) - documented) == []
