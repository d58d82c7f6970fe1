from services.router.app import create_app
from services.router.settings import RouterSettings
from vitrine.service import configure_logging, run_service


def main() -> None:
    settings = RouterSettings()
    configure_logging("router", settings.log_level, settings.log_json)
    run_service(create_app(settings), settings.host, settings.router_port,
                settings.event_loop)


if __name__ == "__main__":
    main()
