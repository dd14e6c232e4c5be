"""The errors sparsify_fx raises; all derive from :class:`SparsifyError`."""

from __future__ import annotations

__all__ = [
    "SparsifyError",
    "ConfigError",
    "CaptureError",
    "PassError",
    "VerificationError",
    "RecipeError",
]


class SparsifyError(Exception):
    """Base class of every error sparsify_fx raises on purpose."""


class ConfigError(SparsifyError, ValueError):
    """A pass config or an argument got an invalid value (the message names the field or
    argument, the value received and what to pass instead). See ``docs/errors.md``."""


class RecipeError(SparsifyError, ValueError):
    """A recipe (config object, list of them, or recipe string) could not be understood."""


class CaptureError(SparsifyError):
    """No capture method could turn the model into a graph.

    ``failures`` maps each method tried to the reason it failed.
    """

    def __init__(self, message: str, failures: dict[str, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


class PassError(SparsifyError):
    """A pass failed; the graph was restored to its state before the pass."""

    def __init__(self, message: str, pass_name: str = "", node: str = ""):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


class VerificationError(SparsifyError):
    """The rewritten module's eval-mode outputs differ from the original's.

    ``report`` is the :class:`~sparsify_fx.verify.VerifyReport` with the first diverging node.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
