"""Team storage: a backup directory kept in an S3-compatible bucket (`s3://bucket/prefix`).

The laptop holds the keys and signs; the server moves the bytes through presigned URLs
(agent/http.py). boto3 is an optional extra, imported only here and in `bucket.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptsync.errors import ConfigError, UsageError

INSTALL = "pip install 'ckptsync[s3]'"

# The AWS settings a bucket's client reads from the environment: where and who (carried into a
# cron entry), and the keys (never written into a crontab).
AWS_CARRIED = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE")
AWS_SECRET = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass(frozen=True)
class StoreUrl:
    bucket: str
    prefix: str   # without a trailing slash; "" for the bucket's top

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_url(url: str) -> StoreUrl:
    rest = url[len("s3://"):] if url.startswith("s3://") else ""
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
        raise UsageError(f"{url}: expected s3://BUCKET/PREFIX")
    return StoreUrl(bucket, prefix)


def require_boto3():
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise ConfigError(f"a bucket store needs boto3: {INSTALL}") from None
    return boto3
