"""Typing helpers shared by the drivers (no runtime behaviour)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, Protocol, TypeVar, overload


from .core import NotFound, Versioned

PS = ParamSpec("PS")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class CachedFunction(Protocol[PS, R_co]):
    """What ``@cache.cached(template)`` returns: the function with its signature, plus ``key`` and ``invalidate``.

    Calling it returns the cached value or ``NOT_FOUND`` (a negative entry).
    """

    def __call__(self, *args: PS.args, **kwargs: PS.kwargs) -> R_co | NotFound: ...

    def key(self, *args: PS.args, **kwargs: PS.kwargs) -> str: ...

    def invalidate(self, *args: PS.args, **kwargs: PS.kwargs) -> int: ...


class AsyncCachedFunction(Protocol[PS, R_co]):
    """What ``@acache.cached(template)`` returns (a coroutine function with the decorated one's signature)."""

    def __call__(self, *args: PS.args, **kwargs: PS.kwargs) -> Awaitable[R_co | NotFound]: ...

    def key(self, *args: PS.args, **kwargs: PS.kwargs) -> str: ...

    def invalidate(self, *args: PS.args, **kwargs: PS.kwargs) -> Awaitable[int]: ...


class CachedDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[PS, Versioned[R] | NotFound]) -> CachedFunction[PS, R]: ...

    @overload
    def __call__(self, fn: Callable[PS, R]) -> CachedFunction[PS, R]: ...

    def __call__(self, fn: Callable[PS, Any]) -> CachedFunction[PS, Any]: ...


class AsyncCachedDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[PS, Awaitable[Versioned[R] | NotFound]]) -> AsyncCachedFunction[PS, R]: ...

    @overload
    def __call__(self, fn: Callable[PS, Awaitable[R]]) -> AsyncCachedFunction[PS, R]: ...

    def __call__(self, fn: Callable[PS, Any]) -> AsyncCachedFunction[PS, Any]: ...
