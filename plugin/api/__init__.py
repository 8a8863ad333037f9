"""HTTP layer: the Flask app that speaks Docker's volume plugin protocol."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from plugin.api import protocol
from plugin.api.routes import bp, reply
from plugin.driver import VolumeDriver
from plugin.errors import PluginError

log = logging.getLogger(__name__)

#: Real requests are a few hundred bytes; anything near this is not from dockerd.
MAX_REQUEST_BYTES = 1024 * 1024


#: Wraps the WSGI app to observe every request (plugin.metrics.RequestMetrics.wrap); given the
#: protocol's endpoint paths, so anything else can be told apart.
Instrument = Callable[[Any, Iterable[str]], Any]


def create_app(driver: VolumeDriver, instrument: Instrument | None = None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.extensions["stowage.driver"] = driver
    app.register_blueprint(bp)
    _register_error_handlers(app)
    if instrument is not None:
        app.wsgi_app = instrument(app.wsgi_app, protocol.ENDPOINTS)  # type: ignore[method-assign]
    return app


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(PluginError)
    def plugin_error(exc: PluginError) -> Response:
        log.warning("request failed: %s", exc)
        return reply(protocol.error(str(exc)), 500)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc: RequestEntityTooLarge) -> Response:
        return reply(
            protocol.error(f"request body too large (limit {MAX_REQUEST_BYTES} bytes)"), 413
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        # Unknown endpoints and wrong methods: still answer in the protocol's shape.
        if exc.code == 404:
            message = f"unknown endpoint {request.path}; stowage implements: " + ", ".join(
                protocol.ENDPOINTS
            )
        elif exc.code == 405:
            message = f"{request.method} is not supported on {request.path}; use POST"
        else:
            message = f"{exc.name}: {exc.description}"
        return reply(protocol.error(message), exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("internal error")
        return reply(
            protocol.error(
                f"internal error in stowage ({type(exc).__name__}: {exc}); see the plugin log"
            ),
            500,
        )
