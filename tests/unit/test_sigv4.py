"""The hand-written SigV4 signer of plugin.s3.sigv4 against botocore's: for any key, query,
extra headers and session token, both compute the same signature (issue 13: the signer had no
test comparing it with a reference)."""

from __future__ import annotations

import calendar
import re
import time
from urllib.parse import quote

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin.s3.fast import EMPTY_SHA256, FastClient

NOW = calendar.timegm((2026, 12, 2, 8, 0, 0, 0, 0, 0))
_SIG = re.compile(r"Signature=([0-9a-f]{64})")

keys = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r\n"),
    min_size=1,
    max_size=40,
)
query_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
queries = st.dictionaries(
    st.sampled_from(["prefix", "list-type", "uploadId", "partNumber", "continuation-token"]),
    query_values,
    max_size=3,
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20
).filter(lambda v: v.strip())
extra_headers = st.dictionaries(
    st.sampled_from(["content-md5", "x-amz-meta-mode", "x-amz-meta-mtime", "range"]),
    header_values,
    max_size=3,
)


def botocore_signature(
    client: FastClient,
    method: str,
    key: str,
    query: dict[str, str],
    headers: dict[str, str],
    token: str | None,
) -> str:
    path = f"/{quote(client.bucket, safe='')}/{quote(key, safe='/')}"
    qs = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(NOW))
    request = AWSRequest(
        method=method,
        url=f"http://{client.netloc}{path}" + (f"?{qs}" if qs else ""),
        headers={
            **headers,
            "host": client.netloc,
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": amz_date,
            **({"x-amz-security-token": token} if token else {}),
        },
    )
    request.context["timestamp"] = amz_date
    auth = S3SigV4Auth(
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "s3", "eu-west-3"
    )
    string_to_sign = auth.string_to_sign(request, auth.canonical_request(request))
    return str(auth.signature(string_to_sign, request))


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE"]),
    key=keys,
    query=queries,
    headers=extra_headers,
    token=st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
)
def test_signature_matches_botocore(
    method: str, key: str, query: dict[str, str], headers: dict[str, str], token: str | None
) -> None:
    client = FastClient(
        "http://127.0.0.1:9000",
        "bucket-1",
        "eu-west-3",
        lambda: ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token),
    )
    raw = client.request_bytes(
        key, NOW, method=method, query=query, headers=sorted(headers.items())
    ).decode()
    ours = _SIG.search(raw)
    assert ours is not None, raw
    assert ours.group(1) == botocore_signature(client, method, key, query, headers, token)
