"""Typed errors. Library code raises these; only the CLI turns them into messages and exit codes."""


class SpecError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class IncompatibleModels(SpecError):
    """Target and draft cannot be paired (tokenizer, family, rewindability)."""


class BundleError(SpecError):
    """A bundle is missing, incomplete, modified or of an unknown schema."""


class InvalidArgument(SpecError):
    """A request or option is out of range (empty prompt, k, temperature, prompt too long). `param` names the
    argument (the server reports it as the error's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ExportError(SpecError):
    """Building or validating a graph failed; nothing was written at the destination."""


class EngineBusy(SpecError):
    """The Engine is generating for another request: generations on one Engine are serialised."""
