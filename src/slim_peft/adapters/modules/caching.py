"""A value derived from some tensors, kept in inference while they are unchanged: SLIM's masked factors and its
L1 term, the clusters' derived statistics. A tensor counts as unchanged while its in-place version counter and
its storage are the same (an optimizer step, `load_state_dict` or `.to()` changes one of them)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


class DerivedCache:
    """`get(tensors, build)`: `build()` once, again only when one of `tensors` (or `extra`) changed."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, tensors: Sequence[torch.Tensor], build: Callable[[], Any], extra: Hashable = None) -> Any:
        key = (*((t._version, t.data_ptr()) for t in tensors), extra)
        if self.key != key:
            self.key, self.value = key, build()
        return self.value
