"""``GET /metrics``: Prometheus text of the engine's queue and, when the engine has one, its prefix cache
(``engine.prefix_store``, a ``ktcore.prefix_cache.PrefixStore``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ktcore.prefix_cache import metric_families, render_metrics

router = APIRouter()


def engine_families(engine):
    from prometheus_client.core import GaugeMetricFamily

    for attr, name, doc in (("active_count", "ktcore_engine_active_sequences", "sequences being decoded"),
                            ("queued_count", "ktcore_engine_queued_requests", "requests waiting for a slot")):
        value = getattr(engine, attr, None)
        if value is not None:
            yield GaugeMetricFamily(name, doc, value=value)
    store = getattr(engine, "prefix_store", None)
    if store is not None:
        yield from metric_families(store)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    engine = request.app.state.kt.engine
    return Response(render_metrics(lambda: engine_families(engine)), media_type=CONTENT_TYPE_LATEST)
