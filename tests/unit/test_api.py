"""The HTTP layer, spoken to the way dockerd speaks: POST, no Content-Type, Go-encoded bodies."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from flask.testing import FlaskClient

from plugin.api import MAX_REQUEST_BYTES, create_app
from plugin.driver import VolumeDriver

ID = "a" * 64


@pytest.fixture
def client(driver: VolumeDriver) -> FlaskClient:
    return create_app(driver).test_client()


def call(client: FlaskClient, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode() + b"\n")
    resp = client.post(path, data=data)  # deliberately no content_type, like dockerd
    assert resp.content_type == "application/vnd.docker.plugins.v1.1+json"
    return resp.status_code, resp.get_json(force=True)


def test_activate_with_empty_body(client: FlaskClient) -> None:
    assert call(client, "/Plugin.Activate") == (200, {"Implements": ["VolumeDriver"]})


def test_capabilities(client: FlaskClient) -> None:
    assert call(client, "/VolumeDriver.Capabilities", {}) == (
        200,
        {"Capabilities": {"Scope": "local"}},
    )


def test_full_lifecycle(client: FlaskClient) -> None:
    assert call(client, "/VolumeDriver.Create", {"Name": "v", "Opts": None}) == (200, {"Err": ""})
    status, body = call(client, "/VolumeDriver.Get", {"Name": "v"})
    assert status == 200 and body["Err"] == ""
    volume = body["Volume"]
    assert volume["Name"] == "v"
    assert datetime.fromisoformat(volume["CreatedAt"].replace("Z", "+00:00")).tzinfo
    assert volume["Status"]["mounts"] == 0
    status, body = call(client, "/VolumeDriver.Mount", {"Name": "v", "ID": ID})
    assert (status, body["Err"]) == (200, "")
    assert body["Mountpoint"] == volume["Mountpoint"]
    assert call(client, "/VolumeDriver.Path", {"Name": "v"})[1]["Mountpoint"] == body["Mountpoint"]
    _, listed = call(client, "/VolumeDriver.List", {})
    assert listed == {"Volumes": [{"Name": "v", "Mountpoint": body["Mountpoint"]}], "Err": ""}
    assert call(client, "/VolumeDriver.Unmount", {"Name": "v", "ID": ID}) == (200, {"Err": ""})
    assert call(client, "/VolumeDriver.Remove", {"Name": "v"}) == (200, {"Err": ""})
    assert call(client, "/VolumeDriver.List", {}) == (200, {"Volumes": [], "Err": ""})


def test_get_unknown_volume_is_an_error(client: FlaskClient) -> None:
    status, body = call(client, "/VolumeDriver.Get", {"Name": "nope"})
    assert status == 500 and body["Err"] == "volume 'nope' not found"
    assert "Volume" not in body


def test_go_style_key_casing_is_tolerated(client: FlaskClient) -> None:
    assert call(client, "/VolumeDriver.Create", {"name": "v", "opts": {"MODE": "0700"}})[0] == 200
    _, body = call(client, "/VolumeDriver.Get", {"NAME": "v"})
    assert body["Volume"]["Status"]["options"] == {"mode": "0700"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"\xff\xfe", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object, got list"),
        (b'"Name"', "must be a JSON object, got str"),
        (b"{}", "request is missing the 'Name' field"),
        (b"", "empty request body (dockerd retries"),
        (b"null", "request is missing the 'Name' field"),
        (b'{"Name": 5}', "field 'Name' must be a string, got int"),
        (b'{"Name": "v", "Opts": []}', "field 'Opts' must be a JSON object"),
        (b'{"Name": "v", "Opts": {"uid": 1000}}', "option 'uid' must have a string value"),
        (b'{"Name": "../x"}', "must not contain '.' or '..'"),
    ],
)
def test_malformed_create_names_the_problem(client: FlaskClient, raw: bytes, message: str) -> None:
    status, body = call(client, "/VolumeDriver.Create", raw=raw)
    assert status == 500
    assert message in body["Err"]


def test_mount_without_id_is_refused(client: FlaskClient) -> None:
    call(client, "/VolumeDriver.Create", {"Name": "v"})
    status, body = call(client, "/VolumeDriver.Mount", {"Name": "v"})
    assert (status, body) == (500, {"Err": "request is missing the 'ID' field"})


def test_unknown_endpoint_and_method(client: FlaskClient) -> None:
    status, body = call(client, "/VolumeDriver.Snapshot", {})
    assert status == 404 and "unknown endpoint /VolumeDriver.Snapshot" in body["Err"]
    resp = client.get("/VolumeDriver.List")
    assert resp.status_code == 405
    assert "use POST" in resp.get_json(force=True)["Err"]


def test_huge_body_is_refused(client: FlaskClient) -> None:
    status, body = call(client, "/VolumeDriver.Create", raw=b" " * (MAX_REQUEST_BYTES + 1))
    assert status == 413 and "too large" in body["Err"]


def test_unexpected_exception_becomes_err(client: FlaskClient, driver: VolumeDriver) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("disk on fire")

    driver.create = boom  # type: ignore[method-assign]
    status, body = call(client, "/VolumeDriver.Create", {"Name": "v"})
    assert status == 500
    assert (
        body["Err"] == "internal error in stowage (RuntimeError: disk on fire); see the plugin log"
    )


def test_list_follows_creates_and_removes(client: FlaskClient) -> None:
    """List answers are cached between changes; every change must show at once."""
    seen = []
    for name in ("a", "b", "c"):
        call(client, "/VolumeDriver.Create", {"Name": name})
        seen.append(sorted(v["Name"] for v in call(client, "/VolumeDriver.List", {})[1]["Volumes"]))
    call(client, "/VolumeDriver.Remove", {"Name": "b"})
    final = sorted(v["Name"] for v in call(client, "/VolumeDriver.List", {})[1]["Volumes"])
    assert seen == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert final == ["a", "c"]
