"""The one parser of S3's XML answers: listings, multipart control documents and <Error>.

Answers are outside input; anything unexpected raises `FastPathError` (the caller asks its
general client), and an <Error> document, in any status (CompleteMultipartUpload may fail
inside a 200), becomes its code and message."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus
from xml.etree import ElementTree

from plugin.s3.dates import parse_iso_date
from plugin.s3.errors import FastPathError

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
_NS = "{" + NAMESPACE + "}"


def ns(root: ElementTree.Element) -> str:
    """The S3 namespace prefix if the document uses it (some servers leave it out)."""
    return _NS if root.tag.startswith(_NS) else ""


def xml_root(body: bytes) -> ElementTree.Element | None:
    """The document's root, or None for an empty or unparsable body."""
    try:
        return ElementTree.fromstring(body) if body.strip() else None
    except ElementTree.ParseError:
        return None


def error_of(root: ElementTree.Element | None) -> tuple[str, str]:
    """(Code, Message) of an S3 <Error> document; ("", "") if *root* is not one."""
    if root is None or root.tag.rpartition("}")[2] != "Error":
        return "", ""
    prefix = ns(root)
    return root.findtext(f"{prefix}Code") or "Error", root.findtext(f"{prefix}Message") or ""


def error_code(body: bytes | None) -> str:
    """The Code of an <Error> body ("" if it is not one)."""
    return error_of(xml_root(body or b""))[0]


def parse_list(body: bytes) -> dict[str, Any]:
    """A ListObjectsV2 page, shaped like botocore's answer (the keys callers use): Contents
    [Key, Size, ETag, LastModifiedNs], CommonPrefixes [Prefix], IsTruncated,
    NextContinuationToken. Keys of an `encoding-type=url` answer are decoded."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise FastPathError(f"LIST: bad XML: {exc}") from exc
    prefix = ns(root)
    if root.tag != f"{prefix}ListBucketResult":
        code, message = error_of(root)
        raise FastPathError(f"LIST: unexpected answer {root.tag} {code} {message}".rstrip(), code)
    url = (root.findtext(f"{prefix}EncodingType") or "").lower() == "url"

    def _name(value: str | None) -> str:
        if value is None:
            raise FastPathError("LIST: entry without a name")
        # encoding-type=url is form encoding: "+" is a space, "%2B" a plus (as botocore).
        return unquote_plus(value) if url else value

    contents = [
        {
            "Key": _name(c.findtext(f"{prefix}Key")),
            "Size": int(c.findtext(f"{prefix}Size") or 0),
            "ETag": c.findtext(f"{prefix}ETag"),
            "LastModifiedNs": parse_iso_date(c.findtext(f"{prefix}LastModified")),
        }
        for c in root.iterfind(f"{prefix}Contents")
    ]
    prefixes = [
        {"Prefix": _name(p.findtext(f"{prefix}Prefix"))}
        for p in root.iterfind(f"{prefix}CommonPrefixes")
    ]
    return {
        "Contents": contents,
        "CommonPrefixes": prefixes,
        "IsTruncated": (root.findtext(f"{prefix}IsTruncated") or "").lower() == "true",
        "NextContinuationToken": root.findtext(f"{prefix}NextContinuationToken"),
    }


def parse_uploads(root: ElementTree.Element) -> list[tuple[str, str, int]]:
    """(key, upload id, initiated ns) of a ListMultipartUploads answer."""
    prefix = ns(root)
    return [
        (
            u.findtext(f"{prefix}Key") or "",
            u.findtext(f"{prefix}UploadId") or "",
            parse_iso_date(u.findtext(f"{prefix}Initiated")),
        )
        for u in root.iterfind(f"{prefix}Upload")
    ]


def complete_body(parts: list[tuple[int, str]]) -> bytes:
    """The CompleteMultipartUpload request document."""
    body = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{_escape(etag)}</ETag></Part>"
        for n, etag in parts
    )
    return f'<CompleteMultipartUpload xmlns="{NAMESPACE}">{body}</CompleteMultipartUpload>'.encode()


def _escape(text: str) -> str:
    """*text* as XML character data. (xml.sax.saxutils.escape does the same, but importing
    it pulls urllib.request, http.client and email in: 13-20 ms of every copy's start.)"""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
