from services.shard.app import create_app
from services.shard.settings import ShardSettings
from vitrine.service import configure_logging, run_service


def main() -> None:
    settings = ShardSettings()
    configure_logging(f"shard-{settings.shard_id}", settings.log_level, settings.log_json)
    run_service(create_app(settings), settings.host, settings.shard_port,
                settings.event_loop)


if __name__ == "__main__":
    main()
