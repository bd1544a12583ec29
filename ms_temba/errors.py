"""The error of a bad configuration field, raised by every config dataclass of the project.

The model configs (`MSTembaConfig`, `MSTCTConfig`, `MSTCNConfig`, `FrameMLPConfig`, the registry's
`model_config`) and `extractors.config.ExtractorConfig` raise `ConfigFieldError` when they reject a
value. It is a ValueError whose message reads as before ("MSTembaConfig.d_state must be a positive
int, got 0"), and it carries the parts, so that a caller (pipelines.config) names the parameter from
`.field` instead of parsing the text:

    owner    what holds the field: "MSTembaConfig", "extractor"
    field    the field, dotted below the owner: "d_state", "i3d.mode"
    problem  the message without "<owner>.<field>": "must be a positive int, got 0"
"""
from __future__ import annotations

__all__ = ["ConfigFieldError"]


class ConfigFieldError(ValueError):
    """A config dataclass rejected the value of `field` (see the module docstring)."""

    def __init__(self, owner: str, field: str, problem: str, message: str | None = None):
        self.owner = owner
        self.field = field
        self.problem = problem
        # `message` replaces the usual "<owner>.<field> <problem>" where a message reads otherwise.
        super().__init__(message if message is not None else f"{owner}.{field} {problem}")
