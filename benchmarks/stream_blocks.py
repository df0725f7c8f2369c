"""What a streamed sample costs on the wire, per block size: bytes and range requests when nothing is cached yet
(every sample in a new region of a large file, as with random access into a dataset much larger than a worker's
block cache), and when a worker's cache holds the files (a small dataset). Writes docs/benchmarks_stream_blocks.md.

    python benchmarks/stream_blocks.py [--episodes 4] [--samples 40] [--out docs/benchmarks_stream_blocks.md]

The dataset is the demo's at 480x640 (3 AV1 cameras, keyframe every 2 frames as lerobot encodes), served by the
tests' Hub server (tests/hub_server.py) and read with accel_train.streaming as a training worker reads it.
Bytes and requests are counted in huggingface_hub's HfFileSystemFile._fetch_range.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]
PORT = 18767  # huggingface_hub reads HF_ENDPOINT at import: the server's address is fixed before that
os.environ.update(HF_HUB_DISABLE_XET="1", HF_ENDPOINT=f"http://127.0.0.1:{PORT}", HF_TOKEN="hf_test_token")

from compare import machine  # noqa: E402
from hub_server import HubServer, publish_dataset  # noqa: E402

from accel_train import streaming  # noqa: E402

BLOCKS = ((2 * 2**20, 8), (512 * 2**10, 16), (256 * 2**10, 32), (128 * 2**10, 64))  # (bytes, blocks per file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks_stream_blocks.md")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.update(HF_HOME=f"{scratch}/home", HF_LEROBOT_HOME=f"{scratch}/home/lerobot")
        results = measure(Path(scratch), args.episodes, args.samples)
    rows = [f"| {block // 2**10} KiB x {count} | " + " | ".join(f"{v:.0f}" if i % 2 == 0 else f"{v:.2f}"
            for i, v in enumerate(cells)) + " |" for (block, count), cells in results.items()]  # fmt: skip
    ours, large = results[(streaming.BLOCK_BYTES, streaming.BLOCKS_PER_FILE)], results[BLOCKS[0]]
    text = f"""# Streaming: what a sample costs on the wire, per block size

Written by `python benchmarks/stream_blocks.py --episodes {args.episodes} --samples {args.samples}` on
{time.strftime("%Y-%m-%d", time.gmtime(started))}. Machine: {machine()}.
The demo dataset at 480x640 ({args.episodes} episodes, 3 AV1 cameras, a keyframe every 2 frames), streamed from
the tests' Hub server on the loopback; {args.samples} random samples. "Cold": each sample opens its files afresh
(random access into files much larger than a worker's cache: every sample in a new region, its file headers
fetched again). "Warm": one worker's files kept open, as training keeps them (this dataset's files fit the cache).

| block | cold: KiB a sample | cold: requests a sample | warm: KiB a sample | warm: requests a sample |
|---|---|---|---|---|
{chr(10).join(rows)}

accel_train/streaming.py uses {streaming.BLOCK_BYTES // 2**10} KiB blocks, {streaming.BLOCKS_PER_FILE} per file: a sample whose frames are
not cached costs {ours[0] / large[0]:.2f}x the bytes and {ours[1] / large[1]:.2f}x the requests of {BLOCKS[0][0] // 2**20} MiB blocks.
"""  # noqa: E501
    args.out.write_text(text)
    print(text)


def measure(tmp: Path, episodes: int, samples: int) -> dict[tuple[int, int], list[float]]:
    """{(block bytes, blocks per file): [cold KiB, cold requests, warm KiB, warm requests] a sample}."""
    from huggingface_hub import HfApi, hf_file_system

    from accel_train import demo_dataset
    from accel_train.sources import DatasetSource

    root = demo_dataset.create(tmp / "data", episodes=episodes, seed=0, image_size=(480, 640))
    counted = {"bytes": 0, "requests": 0}
    fetch = hf_file_system.HfFileSystemFile._fetch_range

    def counting(self: hf_file_system.HfFileSystemFile, start: int, end: int) -> bytes:
        counted["bytes"] += end - start
        counted["requests"] += 1
        return fetch(self, start, end)

    hf_file_system.HfFileSystemFile._fetch_range = counting
    results = {}
    defaults = streaming.BLOCK_BYTES, streaming.BLOCKS_PER_FILE
    with HubServer(port=PORT):
        commit = publish_dataset(HfApi(), "test-user/big", root)
        meta, _ = streaming.streamed_metadata(DatasetSource("test-user/big", revision=commit))
        rng = random.Random(0)
        chosen = [rng.randrange(meta.total_frames) for _ in range(samples)]
        base = f"hf://datasets/test-user/big@{commit}"
        for block, count in BLOCKS:
            streaming.BLOCK_BYTES, streaming.BLOCKS_PER_FILE = block, count
            dataset = streaming.StreamedDataset(meta, streaming.RemoteFiles(base, commit), None, None, None)
            cells: list[float] = []
            for cold in (True, False):
                counted.update(bytes=0, requests=0)
                for index in chosen:
                    if cold:
                        dataset.reader.files = streaming.RemoteFiles(base, commit)
                    dataset[index]
                cells += [counted["bytes"] / samples / 2**10, counted["requests"] / samples]
            results[(block, count)] = cells
    streaming.BLOCK_BYTES, streaming.BLOCKS_PER_FILE = defaults
    return results


if __name__ == "__main__":
    main()
