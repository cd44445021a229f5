"""The bucket through boto3: the calls ckptsync makes, presigned URLs, and errors by kind.

Credentials, region and endpoint come from the standard AWS configuration (`~/.aws`,
`AWS_PROFILE`, `AWS_ENDPOINT_URL`, ...), overridden by the config's `s3:` block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ckptsync.errors import ConfigError, ConnectError, IOFailure, NotFound
from ckptsync.s3 import StoreUrl, require_boto3

MiB = 1 << 20
PART_SIZE = 64 * MiB          # large enough that a 10 GB optimizer file is 160 requests
MIN_PART = 5 * MiB            # S3's smallest part but the last
MAX_PARTS = 10000
COPY_MAX = 5 * 1024 * MiB     # CopyObject's limit; larger objects are copied part by part
URL_LIFETIME = 3600           # presigned URLs live an hour; each batch gets fresh ones
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
              "InvalidToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
SETTINGS = {
    "endpoint_url": str, "profile": str, "region": str, "server_endpoint_url": str,
    "part_size": int, "url_lifetime": int, "workers": int, "lease_seconds": int, "addressing_style": str,
}


class Conflict(Exception):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class Settings:
    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    server_endpoint_url: str | None = None   # the endpoint as the server reaches it, when it differs
    part_size: int = PART_SIZE
    url_lifetime: int = URL_LIFETIME
    workers: int = 4                          # parallel requests from the server
    lease_seconds: int = 120
    addressing_style: str = "path"

    @classmethod
    def from_config(cls, block: dict[str, Any], where: str = "the config") -> "Settings":
        for key, value in block.items():
            if key not in SETTINGS:
                raise ConfigError(f"s3.{key} in {where}: unknown key (known: {', '.join(sorted(SETTINGS))})")
            if not isinstance(value, SETTINGS[key]) or isinstance(value, bool):
                raise ConfigError(f"s3.{key} in {where}: expected {SETTINGS[key].__name__}, got {value!r}")
        s = cls(**block)
        if s.part_size < MIN_PART:
            raise ConfigError(f"s3.part_size in {where}: at least {MIN_PART} bytes (5 MiB)")
        if s.url_lifetime < 60 or s.lease_seconds < 3:
            raise ConfigError(f"s3.url_lifetime (>= 60) or s3.lease_seconds (>= 3) in {where} is too short")
        return s


def part_size(size: int, wanted: int) -> int:
    """The part size for a file: `wanted`, grown for files that would need more than MAX_PARTS."""
    need = -(-size // MAX_PARTS)
    return max(wanted, -(-need // MiB) * MiB)


def etag(value) -> str:
    """ETags without their quotes: servers differ in whether a copy's result carries them."""
    return str(value or "").strip('"')


def plain_md5(tag: str) -> str | None:
    """The MD5 an ETag stands for, when it is one (a single PUT without KMS); else None."""
    e = etag(tag).lower()
    return e if len(e) == 32 and all(c in "0123456789abcdef" for c in e) else None


class Bucket:
    def __init__(self, url: StoreUrl, settings: Settings) -> None:
        boto3 = require_boto3()
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        self.url = url
        self.settings = settings
        self.endpoint = settings.endpoint_url
        try:
            session = boto3.Session(profile_name=settings.profile, region_name=settings.region)
            cfg = Config(signature_version="s3v4", s3={"addressing_style": settings.addressing_style},
                         retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=15, read_timeout=120)
            self.client = session.client("s3", endpoint_url=settings.endpoint_url, config=cfg)
            # Presigning is offline: a second client signs for the endpoint as the server sees it.
            self.signer = self.client if not settings.server_endpoint_url else session.client(
                "s3", endpoint_url=settings.server_endpoint_url, config=cfg)
        except (BotoCoreError, ValueError) as exc:  # an unknown profile, a malformed endpoint URL
            raise ConfigError(f"cannot set up the S3 client for {url}: {exc}") from None
        self.endpoint = self.client.meta.endpoint_url

    # -------------------------------------------------- errors

    def _call(self, what: str, fn, **kw):
        from botocore import exceptions as bx

        try:
            return fn(Bucket=self.url.bucket, **kw)
        except bx.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                raise Conflict(code) from None
            if code == "NoSuchBucket":
                raise NotFound(f"bucket {self.url.bucket} does not exist at {self.endpoint}",
                               hint="create it, or fix the bucket name in local_dir / --local-dir") from None
            if code in AUTH_CODES or status == 403:
                raise ConfigError(f"the bucket refused the credentials ({code or status}) for {what} in {self.url}",
                                  hint="check the access key and secret (~/.aws/credentials, AWS_PROFILE, s3.profile)"
                                  ) from None
            if code in ("NoSuchKey", "NoSuchUpload", "404", "NotFound"):
                raise KeyError(kw.get("Key", "")) from None
            raise IOFailure(f"{what} in {self.url}: the bucket answered {code or status}: "
                            f"{err.get('Message', '')}".rstrip(": ")) from None
        except bx.NoCredentialsError:
            raise ConfigError("no AWS credentials found for the bucket",
                              hint="set them in ~/.aws/credentials, AWS_PROFILE, s3.profile, or "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as exc:
            raise ConnectError(f"cannot reach the bucket's endpoint {self.endpoint}: {exc}") from None
        except bx.BotoCoreError as exc:
            raise IOFailure(f"{what} in {self.url}: {exc}") from None

    # -------------------------------------------------- objects

    def list(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(key, size, etag) of every object under prefix."""
        token = None
        while True:
            kw = {"Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self._call("listing", self.client.list_objects_v2, **kw)
            for o in page.get("Contents") or []:
                yield o["Key"], int(o["Size"]), etag(o.get("ETag"))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def head(self, key: str) -> tuple[int, str] | None:
        try:
            r = self._call(f"reading {key}", self.client.head_object, Key=key)
        except KeyError:
            return None
        except IOFailure as exc:  # HEAD has no body: a missing key comes back as a bare 404
            if "404" in exc.message:
                return None
            raise
        return int(r["ContentLength"]), etag(r.get("ETag"))

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            r = self._call(f"reading {key}", self.client.get_object, Key=key)
        except KeyError:
            return None
        return r["Body"].read(), etag(r.get("ETag"))

    def stream(self, key: str, chunk: int = MiB) -> Iterator[bytes]:
        try:
            r = self._call(f"reading {key}", self.client.get_object, Key=key)
        except KeyError:
            raise NotFound(f"{self.url.bucket}/{key} is missing from the bucket") from None
        yield from r["Body"].iter_chunks(chunk)

    def put(self, key: str, data: bytes, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write an object; raises Conflict when the condition fails. A server without
        conditional writes (501) gets the write without the condition."""
        kw: dict[str, Any] = {"Key": key, "Body": data}
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if if_match:
            kw["IfMatch"] = if_match
        try:
            return etag(self._call(f"writing {key}", self.client.put_object, **kw).get("ETag"))
        except IOFailure as exc:
            if "NotImplemented" not in exc.message or not (if_none_match or if_match):
                raise
            return etag(self._call(f"writing {key}", self.client.put_object, Key=key, Body=data).get("ETag"))

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            r = self._call("deleting objects", self.client.delete_objects, Delete={"Objects": batch, "Quiet": True})
            if r.get("Errors"):
                e = r["Errors"][0]
                raise IOFailure(f"deleting {e.get('Key')} in {self.url}: {e.get('Code')} {e.get('Message', '')}")

    def copy(self, src: str, dst: str, size: int) -> str:
        """A server-side copy: the bytes never leave the bucket."""
        source = {"Bucket": self.url.bucket, "Key": src}
        if size <= COPY_MAX:
            r = self._call(f"copying {src}", self.client.copy_object, Key=dst, CopySource=source)
            return etag(r["CopyObjectResult"]["ETag"])
        upload = self.start_multipart(dst)
        ps = part_size(size, COPY_MAX // 2)
        parts = []
        for n, start in enumerate(range(0, size, ps), 1):
            end = min(size, start + ps) - 1
            r = self._call(f"copying {src}", self.client.upload_part_copy, Key=dst, UploadId=upload, PartNumber=n,
                           CopySource=source, CopySourceRange=f"bytes={start}-{end}")
            parts.append((n, str(r["CopyPartResult"]["ETag"])))
        return self.complete_multipart(dst, upload, parts)

    def upload_file(self, key: str, path, size: int) -> str:
        """A file on this machine into the bucket (the --via-laptop relay): one PUT, or parts."""
        with open(path, "rb") as f:
            if size < self.settings.part_size:
                return etag(self._call(f"writing {key}", self.client.put_object, Key=key, Body=f).get("ETag"))
            upload = self.start_multipart(key)
            ps = part_size(size, self.settings.part_size)
            parts = []
            for n in range(1, -(-size // ps) + 1):
                r = self._call(f"writing {key}", self.client.upload_part, Key=key, UploadId=upload, PartNumber=n,
                               Body=f.read(ps))
                parts.append((n, str(r["ETag"])))
            return self.complete_multipart(key, upload, parts)

    # -------------------------------------------------- multipart uploads

    def start_multipart(self, key: str) -> str:
        return str(self._call(f"starting an upload of {key}", self.client.create_multipart_upload, Key=key)["UploadId"])

    def parts(self, key: str, upload: str) -> dict[int, tuple[int, str]]:
        """part number -> (size, etag) of what an upload holds so far."""
        out: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            try:
                r = self._call(f"listing the parts of {key}", self.client.list_parts, Key=key, UploadId=upload,
                               PartNumberMarker=marker)
            except KeyError:
                return {}
            for p in r.get("Parts") or []:
                out[int(p["PartNumber"])] = (int(p["Size"]), str(p["ETag"]))
            if not r.get("IsTruncated"):
                return out
            marker = int(r.get("NextPartNumberMarker") or 0)

    def complete_multipart(self, key: str, upload: str, parts: list[tuple[int, str]]) -> str:
        r = self._call(f"finishing the upload of {key}", self.client.complete_multipart_upload, Key=key,
                       UploadId=upload, MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]})
        return etag(r.get("ETag"))

    def abort_multipart(self, key: str, upload: str) -> None:
        try:
            self._call(f"aborting the upload of {key}", self.client.abort_multipart_upload, Key=key, UploadId=upload)
        except KeyError:
            pass

    def uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """(key, upload id, started) of the multipart uploads in progress under prefix, oldest first."""
        out = []
        kw: dict[str, Any] = {"Prefix": prefix}
        while True:
            r = self._call("listing uploads in progress", self.client.list_multipart_uploads, **kw)
            for u in r.get("Uploads") or []:
                out.append((str(u["Key"]), str(u["UploadId"]), u["Initiated"].timestamp()))
            if not r.get("IsTruncated"):
                return sorted(out, key=lambda u: u[2])
            kw.update(KeyMarker=r.get("NextKeyMarker"), UploadIdMarker=r.get("NextUploadIdMarker"))

    # -------------------------------------------------- presigned URLs (offline: no request is made)

    def url_put(self, key: str) -> str:
        return self._presign("put_object", Key=key)

    def url_part(self, key: str, upload: str, number: int) -> str:
        return self._presign("upload_part", Key=key, UploadId=upload, PartNumber=number)

    def url_get(self, key: str) -> str:
        return self._presign("get_object", Key=key)

    def _presign(self, op: str, **params) -> str:
        from botocore.exceptions import BotoCoreError

        try:
            return self.signer.generate_presigned_url(op, Params={"Bucket": self.url.bucket, **params},
                                                      ExpiresIn=self.settings.url_lifetime)
        except BotoCoreError as exc:  # no credentials at all
            raise ConfigError(f"cannot sign a URL for {self.url}: {exc}") from None
