#!/usr/bin/env python3
"""Submit a build through a client generated from kiln's OpenAPI description, wait
for it, and download one of its images (whole, then a range of it).

Generate the client first (openapi-python-client, from PyPI), then run this with the
generated package on PYTHONPATH:

    openapi-python-client generate --path docs/openapi.json --meta none \
        --config examples/api-client/generator.yml --output-path /tmp/kiln-api/kiln_api
    PYTHONPATH=/tmp/kiln-api python3 examples/api-client/build_and_download.py \
        --server http://127.0.0.1:7070 --token-file /var/lib/kiln/admin.token \
        examples/seed release/

It needs a server and a client that takes the build's config types. Exit status 0
when the build finished and the image downloaded matches its SHA-256.
"""

import argparse
import hashlib
import io
import pathlib
import sys
import tarfile
import time

import httpx
from kiln_api import AuthenticatedClient
from kiln_api.api.builds import get_build, list_images, submit_build
from kiln_api.api.images import download_image
from kiln_api.models import ApiError, SubmitBuildBody
from kiln_api.types import File


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def expect(answer, what):
    """The answer of a call, or the end of the script with the refusal it got."""
    if isinstance(answer, ApiError):
        fail(f"{what}: {answer.code}: {answer.error}")
    if answer is None:
        fail(f"{what}: no answer the description lists")
    return answer


def files_archive(directory):
    """The build's files: every file under `directory`, as a tar archive in memory."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(directory).as_posix())
    archive.seek(0)
    return archive


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="the server's URL")
    parser.add_argument("--token-file", required=True, help="the admin token's file")
    parser.add_argument("--wait-secs", type=int, default=600)
    parser.add_argument("build_dir", type=pathlib.Path, help="relbuild.xml and its files")
    parser.add_argument("out_dir", type=pathlib.Path, help="where the image goes")
    args = parser.parse_args()

    token = pathlib.Path(args.token_file).read_text().strip()
    client = AuthenticatedClient(
        base_url=args.server, token=token, timeout=httpx.Timeout(120.0)
    )
    manifest = (args.build_dir / "relbuild.xml").read_bytes()
    body = SubmitBuildBody(
        manifest=File(payload=io.BytesIO(manifest), file_name="relbuild.xml"),
        files=File(payload=files_archive(args.build_dir), file_name="files.tar"),
    )
    submitted = expect(submit_build.sync(client=client, body=body), "submitting")
    build = submitted.number
    print(f"submitted build {build} ({submitted.n_jobs} jobs)")

    deadline = time.monotonic() + args.wait_secs
    while True:
        summary = expect(get_build.sync(build, client=client), f"reading build {build}")
        if summary.n_queued == 0 and summary.n_running == 0:
            break
        if time.monotonic() > deadline:
            fail(f"build {build} did not end within {args.wait_secs} s")
        time.sleep(0.5)
    if summary.n_finished != summary.n_jobs:
        fail(f"build {build} ended with {summary.n_finished} of {summary.n_jobs} jobs finished")
    print(f"build {build}: {summary.n_finished} of {summary.n_jobs} jobs finished")

    images = expect(list_images.sync(build, client=client), "listing images")
    if not images:
        fail(f"build {build} has no image")
    image = images[0]
    whole = download_image.sync_detailed(build, image.job_id, image.name, client=client)
    if whole.status_code != 200:
        fail(f"downloading {image.name}: status {whole.status_code}")
    digest = hashlib.sha256(whole.content).hexdigest()
    if len(whole.content) != image.size or digest != image.sha256:
        fail(f"{image.name}: got {len(whole.content)} bytes with SHA-256 {digest}, "
             f"the server listed {image.size} bytes with {image.sha256}")
    part = download_image.sync_detailed(
        build, image.job_id, image.name, client=client, range_="bytes=1024-2047"
    )
    if part.status_code != 206 or part.content != whole.content[1024:2048]:
        fail(f"a range of {image.name}: status {part.status_code}, not the bytes asked for")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    target = args.out_dir / image.name
    target.write_bytes(whole.content)
    print(f"downloaded {image.job_id}/{image.name}: {image.size} bytes, SHA-256 {digest} "
          f"(and bytes 1024-2047 by range) to {target}")


if __name__ == "__main__":
    main()
