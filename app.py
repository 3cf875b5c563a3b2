"""``python app.py``: the histolab app in the browser (settings from the environment,
see histolab.ui.AppSettings). Importing this file loads and serves nothing."""

from histolab.ui import AppSettings, build_app, launch_options


def main() -> None:
    settings = AppSettings.from_env()
    build_app(settings).launch(**launch_options(settings))


if __name__ == "__main__":
    main()
