"""The one S3 error mapper (infra/storage/s3_errors.py): every message names the object, what S3
answered and the next step, also for a code it has no special case for (S3's own errors: botocore
already retried the throttling and 5xx answers it knows)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from infra.errors import StorageError
from infra.storage.s3_errors import S3Place, s3_error
from infra.storage.s3_settings import S3Settings


@pytest.mark.parametrize("code,status", [("InternalError", 500), ("SlowDown", 503), ("InvalidObjectState", 403),
                                         ("SomethingNew", 400)])
def test_an_error_of_no_known_kind_still_names_the_object_the_answer_and_the_next_step(code, status):
    exc = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                      "PutObject")
    place = S3Place("output", "writing", "bkt", "out/run-1/part-00003.jsonl", "publishing part-00003.jsonl")
    err = s3_error(exc, place, S3Settings(endpoint_url="http://s3.local:9000"))
    text = str(err)
    assert isinstance(err, StorageError) and "\n" not in text
    assert text.startswith("Writing s3://bkt/out/run-1/part-00003.jsonl while publishing part-00003.jsonl failed: ")
    assert code in text and "http://s3.local:9000" in text
    assert "rerun with the same run_id" in text  # the next step: nothing published is lost
