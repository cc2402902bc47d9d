"""The one exception type users see: a one-line message that names the param or file at fault."""


class PipelineError(Exception):
    """A failure the user caused (bad param, missing or foreign file); its message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
