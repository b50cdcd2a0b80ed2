"""The route table: a service (and optionally ``Gw-Target``) → a named adapter instance."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config.model import RouteConfig

__all__ = ["RouteTable"]


class RouteTable:
    """Exact (service, target) routes win over the target's region (``<region>:*``, as
    the federation directory routes), which wins over the service's catch-all route."""

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        self._routes: dict[tuple[str, str | None], str] = {
            (r.service, r.target): r.adapter for r in routes
        }

    def lookup(self, service: str, target: str | None) -> str | None:
        if target is not None:
            adapter = self._routes.get((service, target))
            if adapter is not None:
                return adapter
            adapter = self._routes.get((service, target.split(":", 1)[0] + ":*"))
            if adapter is not None:
                return adapter
        return self._routes.get((service, None))

    def routes(self) -> list[RouteConfig]:
        return [RouteConfig(service=s, target=t, adapter=a) for (s, t), a in self._routes.items()]
