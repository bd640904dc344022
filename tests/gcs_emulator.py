"""`gcp-storage-emulator` as the tests run it: `python tests/gcs_emulator.py start --host=... --port=...`.

One fix makes it answer as GCS does: a media download (`alt=media`) carries the object's generation in the
`x-goog-generation` header. Without it TensorStore reads generation 0, and its next conditional request on that
object (OCDBT re-reading or rewriting a manifest) fails with "Malformed StorageGeneration", now and then, in
saves and restores alike.
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):  # noqa: ANN001, ANN201 (the emulator's handler signature)
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module builds its routing table from it

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
