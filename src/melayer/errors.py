"""User-facing errors: the CLI prints each as one line and exits non-zero."""


class MelayerError(Exception):
    """A problem with the user's input (model, file, argument), not a bug."""
