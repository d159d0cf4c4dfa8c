"""Reading a stream's files from an object store: one at a time against toolkit.data.streaming.READ_THREADS at
once, side by side, from a local S3 endpoint (moto, what the tests use) through pyarrow's S3FileSystem, the
filesystem Ray Data's read tasks use.

    python benchmarks/object_store_reads.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz --files 1000

A local moto server answers from one Python process, so it, not the round trip, is the limit here; a real
object store answers each GET after tens of milliseconds of round trip, which reading in threads overlaps.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.data.streaming import READ_THREADS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a .tar.gz of JPEGs (the first --files are uploaded)")
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    import boto3
    from pyarrow import fs as pafs

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id="t", aws_secret_access_key="t",
                              region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        keys = []
        with tarfile.open(args.data) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".jpg"):
                    client.put_object(Bucket="bench", Key=f"{len(keys)}.jpg", Body=tar.extractfile(m).read())
                    keys.append(f"bench/{len(keys)}.jpg")
                    if len(keys) == args.files:
                        break
        fs = pafs.S3FileSystem(endpoint_override=url, access_key="t", secret_key="t", region="us-east-1",
                               scheme="http")

        def read(key):
            with fs.open_input_file(key) as f:
                return f.read()

        print("| round | one at a time, files/s | READ_THREADS (%d) at once, files/s | ratio |" % READ_THREADS)
        print("|---:|---:|---:|---:|")
        for r in range(args.rounds):
            rates = []
            for threads in (1, READ_THREADS):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    n = sum(1 for _ in pool.map(read, keys))
                rates.append(n / (time.perf_counter() - t0))
            print(f"| {r + 1} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[1] / rates[0]:.2f}x |")
    finally:
        server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
