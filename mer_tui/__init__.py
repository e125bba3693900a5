"""mer-tui: the app (CLI and Textual UI) over the `engine` package."""

__version__ = "0.1.0"
