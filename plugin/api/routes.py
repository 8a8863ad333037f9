"""The nine protocol endpoints: decode the request, call the driver, encode the answer."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, current_app, request

from plugin.api import protocol
from plugin.driver import VolumeDriver
from plugin.errors import InvalidRequestError

log = logging.getLogger(__name__)

bp = Blueprint("volume_driver", __name__)


def reply(payload: dict[str, Any], status: int = 200) -> Response:
    # Plain json.dumps: Flask's provider sorts keys, which costs milliseconds on a List of 10,000.
    return Response(json.dumps(payload), status=status, mimetype=protocol.CONTENT_TYPE)


def _driver() -> VolumeDriver:
    driver: VolumeDriver = current_app.extensions["stowage.driver"]
    return driver


def _body() -> dict[str, Any]:
    """The request body, for endpoints that need fields in it."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        # dockerd re-sends a request cut off by a plugin restart without its body
        # (moby/moby#39331): say so, instead of only "missing field".
        raise InvalidRequestError(
            "empty request body (dockerd retries a request interrupted by a plugin restart "
            "without its body); run the docker command again"
        )
    return protocol.parse_body(raw)


@bp.post(protocol.ACTIVATE)
def activate() -> Response:
    log.info("request %s ", protocol.ACTIVATE)
    return reply({"Implements": ["VolumeDriver"]})


@bp.post(protocol.CAPABILITIES)
def capabilities() -> Response:
    log.info("request %s ", protocol.CAPABILITIES)
    return reply({"Capabilities": {"Scope": _driver().capabilities()}})


@bp.post(protocol.CREATE)
def create() -> Response:
    req = protocol.CreateRequest.parse(_body())
    log.info("request %s name=%r opts=%s", protocol.CREATE, req.name, sorted(req.opts))
    driver = _driver()
    driver.create(req.name, req.opts)
    _list_entry(req.name, driver.path(req.name))  # encoded now, so List stays fast
    return reply(protocol.ok())


@bp.post(protocol.REMOVE)
def remove() -> Response:
    req = protocol.NameRequest.parse(_body())
    log.info("request %s name=%r", protocol.REMOVE, req.name)
    _driver().remove(req.name)
    return reply(protocol.ok())


@bp.post(protocol.MOUNT)
def mount() -> Response:
    req = protocol.MountRequest.parse(_body())
    log.info("request %s name=%r id=%s", protocol.MOUNT, req.name, req.mount_id)
    mountpoint = _driver().mount(req.name, req.mount_id)
    return reply({"Mountpoint": mountpoint, "Err": ""})


@bp.post(protocol.UNMOUNT)
def unmount() -> Response:
    req = protocol.MountRequest.parse(_body())
    log.info("request %s name=%r id=%s", protocol.UNMOUNT, req.name, req.mount_id)
    _driver().unmount(req.name, req.mount_id)
    return reply(protocol.ok())


@bp.post(protocol.PATH)
def path() -> Response:
    req = protocol.NameRequest.parse(_body())
    log.info("request %s name=%r", protocol.PATH, req.name)
    return reply({"Mountpoint": _driver().path(req.name), "Err": ""})


@bp.post(protocol.GET)
def get() -> Response:
    req = protocol.NameRequest.parse(_body())
    log.debug("request %s name=%r", protocol.GET, req.name)
    info = _driver().get(req.name)
    volume = protocol.volume_json(info.name, info.mountpoint, info.created_at, info.status)
    return reply({"Volume": volume, "Err": ""})


def _list_entries() -> dict[tuple[str, str], bytes]:
    entries: dict[tuple[str, str], bytes] = current_app.extensions.setdefault(
        "stowage.list_entries", {}
    )
    return entries


def _list_entry(name: str, mountpoint: str) -> bytes:
    entry = json.dumps(protocol.volume_json(name, mountpoint)).encode()
    _list_entries()[(name, mountpoint)] = entry
    return entry


@bp.post(protocol.LIST)
def list_volumes() -> Response:
    # Get and List are logged at DEBUG: dockerd calls them constantly (inspect, every start).
    log.debug("request %s ", protocol.LIST)
    # Encoding 10,000 volumes costs tens of ms, yet the answer only changes on Create and
    # Remove: keep the whole answer per driver generation, and each volume's encoded entry, so
    # a change re-encodes one entry and joins the rest.
    driver = _driver()
    cache = current_app.extensions.setdefault("stowage.list_cache", {})
    entries = _list_entries()
    generation = driver.generation
    body = cache.get(generation)
    if body is None:
        volumes = driver.list()
        parts = [entries.get(key) or _list_entry(*key) for key in volumes]
        if len(entries) > 2 * len(volumes) + 100:  # forget removed volumes now and then
            live = set(volumes)
            for key in [k for k in list(entries) if k not in live]:  # list(): other threads
                entries.pop(key, None)
        body = b'{"Volumes": [' + b", ".join(parts) + b'], "Err": ""}'
        cache.clear()
        cache[generation] = body
    return Response(body, status=200, mimetype=protocol.CONTENT_TYPE)
