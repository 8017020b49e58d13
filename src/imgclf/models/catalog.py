"""The catalog of networks: `model.name` -> the nn.Module class built from its config section.

Imports no network: each module in imgclf/models/ registers its class with `@register_model`,
and the package imports every module, so adding an architecture is its module plus its config.
"""

from collections.abc import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}  # called as cls(config, input_shape, n_classes)


def register_model(name: str):
    """Class decorator: build `model.name == name` with `cls(config, input_shape, n_classes)`."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = cls
        return cls

    return add
