"""AI loop benchmark: time from the last instance's C-STORE response to the SEG being queryable
(QIDO-RS), and inference time per volume, on the CPU and on CUDA when torch sees one.

    .venv/bin/python -m tools.bench_ai                       # 3 phantom series, stable_age 10
    .venv/bin/python -m tools.bench_ai --stable-age 1 --series 5 --json out.json

Each phantom series (30 x 256 x 256, tools/phantom.py, seeds the model never trained on) is sent
with DCMTK storescu to a server started with the AI loop on; the clock starts when storescu has
its last C-STORE response and stops when ``/dicom-web/series?ReferencedSeriesSequence.
SeriesInstanceUID=`` lists the SEG.  That latency includes ``stable_age`` by design (the series
must be complete before it is analysed); the report also gives it without.  The in-process part
loads the model once and times ``predict`` alone on each device.  Orthanc has no AI loop to
compare with; its nearest equivalent, the ``OnStableSeries`` callback, waits ``StableAge`` (60 s
by default) before anything starts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread

from tools.phantom import make_phantom, write_series
from tools.procs import NODELAY_ENV, OurServer, dcmtk, log, write_config

SEEDS = range(900_000, 900_100)  # held out: training uses 1000+, evaluation 1..N


def _derived(http: httpx.Client, series_uid: str) -> list[Any]:
    response = http.get(
        "/dicom-web/series", params={"ReferencedSeriesSequence.SeriesInstanceUID": series_uid}
    )
    return response.json() if response.status_code == 200 else []


def end_to_end(args: argparse.Namespace, scratch: Path) -> list[dict[str, float]]:
    toml = f'[ae]\ntitle = "IMAGING"\n[ai]\nstable_age = {args.stable_age}\npoll_interval = 0.1\n'
    toml += f"threads = {args.threads}\n"
    server = OurServer(
        scratch / "data",
        write_config(scratch / "config", server=toml),
        env={"IMAGING_AI_ENABLED": "true"},
    ).start()
    runs: list[dict[str, float]] = []
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            for n, seed in enumerate(SEEDS[: args.series]):
                folder = scratch / f"series{n}"
                files = write_series(make_phantom(seed), folder, patient_id=f"BENCH{n}")
                cmd = [dcmtk("storescu"), "-aec", "IMAGING", "127.0.0.1", str(server.port)]
                subprocess.run([*cmd, *map(str, files)], check=True, env={**NODELAY_ENV})
                sent = time.monotonic()
                series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                while not any(
                    d["00080060"]["Value"][0] == "SEG" for d in _derived(http, series_uid)
                ):
                    if time.monotonic() - sent > 600:
                        raise RuntimeError("no SEG after 600 s:\n" + server.log()[-3000:])
                    time.sleep(0.05)
                latency = time.monotonic() - sent
                while True:  # the SEG is stored just before the job is marked completed
                    listed = http.get("/api/v1/ai/analyze", params={"series_uid": series_uid})
                    analysis = listed.json()["data"]["analyses"][-1]
                    if analysis["status"] in ("completed", "failed"):
                        break
                    time.sleep(0.05)
                runs.append(
                    {
                        "latency_s": latency,
                        "after_stable_age_s": latency - args.stable_age,
                        "inference_s": float(analysis["inference_seconds"] or 0),
                    }
                )
                log(f"  series {n}: SEG queryable {latency:.2f} s after the last C-STORE")
    finally:
        server.stop()
    return runs


def inference_only(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import torch

    from server.ai.models import load_segmenter

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict[str, dict[str, float]] = {}
    volumes = [make_phantom(seed) for seed in SEEDS[: args.volumes]]
    for device in devices:
        segmenter = load_segmenter(Path(args.model), device, args.threads)
        segmenter(volumes[0].t2, volumes[0].spacing)  # warm-up (CUDA context, allocator)
        times = []
        for phantom in volumes:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            segmenter(phantom.t2, phantom.spacing)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x{args.threads}"
        results[device] = {
            "device": name,  # type: ignore[dict-item]
            "mean_s": statistics.mean(times),
            "min_s": min(times),
            "max_s": max(times),
        }
        log(f"  {name}: {statistics.mean(times):.3f} s per volume")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=3, help="series sent end to end")
    parser.add_argument("--volumes", type=int, default=5, help="volumes timed in process")
    parser.add_argument("--stable-age", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for inference")
    parser.add_argument(
        "--model", default=str(Path(__file__).parent.parent / "models" / "prostate-phantom")
    )
    parser.add_argument("--skip-server", action="store_true", help="inference timing only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report: dict[str, Any] = {"stable_age_s": args.stable_age, "threads": args.threads}
    log("inference per volume (in process):")
    report["inference"] = inference_only(args)
    if not args.skip_server:
        log("end to end (storescu -> SEG in QIDO):")
        with tempfile.TemporaryDirectory() as scratch:
            runs = end_to_end(args, Path(scratch))
        report["end_to_end"] = runs
        latencies = [r["latency_s"] for r in runs]
        print(
            f"last C-STORE -> SEG queryable: mean {statistics.mean(latencies):.2f} s "
            f"(stable_age {args.stable_age:g} s included; "
            f"{statistics.mean(latencies) - args.stable_age:.2f} s after it), "
            f"inference in the worker {statistics.mean(r['inference_s'] for r in runs):.2f} s"
        )
    for figures in report["inference"].values():
        print(f"inference per 30x256x256 volume on {figures['device']}: {figures['mean_s']:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
