"""`option(...)`: a schema field that carries its documentation and its sd-scripts names.

The doc, the sd-scripts flag and the ss_* metadata keys of a field are data on the field
(dataclasses field metadata), so `atelier options`, the README's option table,
`atelier export-kohya` and the LoRA metadata writer all read one source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_NO_DEFAULT: Any = object()


def option(
    default: Any = _NO_DEFAULT,
    *,
    doc: str,
    flag: str | None = None,
    ss: str | tuple[str, ...] = (),
    kohya: str = "",
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its metadata.

    doc: what the option does (shown by `atelier options` and the README table).
    flag: sd-scripts' train_network.py option name, no dashes ("network_dim"). A value
      given inside another option names both: "network_args conv_dim", "sample_prompts --w".
    ss: the ss_* metadata key(s) the field feeds (copied, or computed from it).
    kohya: how the option relates to sd-scripts where the flag alone does not say it
      (no equivalent and why, another default, another spelling).
    """
    metadata = {"doc": " ".join(doc.split()), "flag": flag, "ss": (ss,) if isinstance(ss, str) else tuple(ss),
                "kohya": kohya}  # fmt: skip
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if default is _NO_DEFAULT:
        raise TypeError("option() needs a default or a default_factory")
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(flag: str) -> str:
    """The option itself: "network_args conv_dim" -> "network_args"."""
    return flag.split()[0]
