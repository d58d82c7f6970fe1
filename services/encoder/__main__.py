from services.encoder.app import create_app
from services.encoder.settings import EncoderSettings
from vitrine.service import configure_logging, run_service


def main() -> None:
    settings = EncoderSettings()
    configure_logging("encoder", settings.log_level, settings.log_json)
    run_service(create_app(settings), settings.host, settings.encoder_port,
                settings.event_loop)


if __name__ == "__main__":
    main()
