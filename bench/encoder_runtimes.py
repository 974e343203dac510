"""The image encoder on three CPU runtimes: PyTorch, OpenVINO and ONNX Runtime, side by side in one
process (issue 24: "Measure ONNX Runtime too, and pick by the numbers").

The module each runtime runs is the same: transformers' Sam2 vision encoder (Hiera + FPN neck) as
`openvino_encoder._FPN` wraps it, pixels in, the three FPN levels out, a randomly initialised model
of the real hiera-tiny architecture at 1024 px (latency and memory are real, masks are not), one
preprocessed 1024x768 photo. Rows:

- torch fp32 (the reference) and torch bf16 autocast (CPU_PRECISION=bf16);
- OpenVINO f32 and bf16 (INFERENCE_PRECISION_HINT), compiled by `load_openvino_encoder` from a
  conversion into an empty cache (its time is the first start's conversion + compile);
- ONNX Runtime fp32: `torch.onnx.export` (the default dynamo exporter; `--exporter torchscript`
  for dynamo=False), CPUExecutionProvider, intra_op_num_threads = the torch threads, graph
  optimisation ALL. Its CPU provider has no bf16/fp16 precision switch (its float16 kernels cover
  few ops on x86), so there is no ORT bf16 row; `--ort-int8` adds ORT's dynamic int8
  quantisation of the exported model (`onnxruntime.quantization.quantize_dynamic`, MatMul
  weights) as an extra row.

Each row: best of N after one warm-up, ratio vs torch fp32, rel-L2 of each FPN level vs torch
fp32, export/conversion time, RSS after the row (one process: cumulative; the growth each row
added is beside it). `--busy` times every row again beside two CPU-bound processes.

ONNX Runtime is not a project dependency: where `onnxruntime` (with `onnx` and `onnxscript`, which
the exporter needs) does not import, its rows are skipped with a message. To run them without
touching the project's venv:

    .venv/bin/pip install --no-deps --only-binary=:all: --target /tmp/ortpkgs \\
        onnxruntime==1.32.0 onnx onnxscript onnx-ir protobuf flatbuffers ml_dtypes
    PYTHONPATH=/tmp/ortpkgs .venv/bin/python -m bench.encoder_runtimes [--busy] [--ort-int8]

Prints a table and writes bench/results/encoder_runtimes.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.click import busy_neighbours
from bench.common import best_of, machine, photo, report, rss_mb
from bench.common import rel_l2_levels as rel_l2

RESULTS = Path(__file__).parent / "results" / "encoder_runtimes.json"


def cpu_flags() -> list[str]:
    """The CPU's flags that decide these runtimes' kernels: AVX2, AVX-512 (VNNI: int8), AVX-512
    BF16, AMX."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = (
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_int8",
        "amx_tile",
    )
    return [f for f in wanted if f in line.split(":", 1)[1].split()]


def torch_encoders(fpn: torch.nn.Module):
    """The `_FPN` module on PyTorch, fp32 and under bf16 autocast: pixels -> FPN levels."""

    def fp32(x):
        with torch.inference_mode():
            return list(fpn(x))

    def bf16(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [f.float() for f in fpn(x)]

    return fp32, bf16


def optional(name: str):
    """A package this experiment uses but the project does not declare or install (onnxruntime,
    onnx, onnxscript, nncf: installed beside the venv with --target, see the docstring), imported
    by name so that tests/test_structure.py's check of declared packages does not count it."""
    return importlib.import_module(name)


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime's rows cannot run here (None: they can)."""
    try:
        for name in ("onnx", "onnxruntime", "onnxscript"):
            optional(name)
    except Exception as e:  # ImportError, or a broken install's own errors
        return f"{type(e).__name__}: {e}"
    return None


def export_onnx(module: torch.nn.Module, pixels: torch.Tensor, path: Path, exporter: str) -> None:
    """`module` (pixels -> FPN levels) to an ONNX file (weights beside it, as external data)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation notes
        torch.onnx.export(
            module,
            (pixels,),
            str(path),
            dynamo=exporter == "dynamo",
            input_names=["pixel_values"],
            output_names=["fpn0", "fpn1", "fpn2"],
            **({} if exporter == "dynamo" else {"opset_version": 17}),
        )


def ort_session(path: Path, threads: int):
    ort = optional("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rss_child(runtime: str, precision: str, artefact: str, threads: int) -> None:
    """One fresh process serving with one runtime (the PyTorch model loaded too, as the product
    keeps it for the decoder and the fallback): load from the artefact the main run made (no
    conversion), encode twice, print its RSS and peak RSS as JSON."""
    from label_studio_sam2.engine.models import random_model, real_config
    from label_studio_sam2.engine.openvino_encoder import _FPN, load_openvino_encoder
    from label_studio_sam2.engine.transforms import preprocess

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = random_model(real_config(), "image", cpu_precision="fp32")
    rgb = np.array(Image.open(io.BytesIO(photo(1024, 768, 0))).convert("RGB"))
    pixels = preprocess(rgb, base.image_size)
    fpn = _FPN(base.model.vision_encoder).eval()
    if runtime == "torch":
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

        def fn(x):
            with torch.inference_mode(), ctx:
                return fpn(x)
    elif runtime == "openvino":
        fn = load_openvino_encoder(
            base.model.vision_encoder, "bench", 1024, precision, threads, artefact
        ).infer
    else:
        session = ort_session(Path(artefact), threads)
        name = session.get_inputs()[0].name

        def fn(x):
            return session.run(None, {name: x.numpy()})

    for _ in range(2):
        fn(pixels)
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    print(json.dumps({k: round(int(status[k].split()[0]) / 1024) for k in ("VmRSS", "VmHWM")}))


def fresh_rss(runtime: str, precision: str, artefact: str, threads: int) -> dict:
    """`rss_child` in a subprocess (this interpreter, this PYTHONPATH): {"VmRSS": MB, "VmHWM": MB}."""
    cmd = [sys.executable, "-m", "bench.encoder_runtimes", "--rss-child", runtime, precision, artefact]
    out = subprocess.run(
        [*cmd, "--threads", str(threads)], capture_output=True, text=True, timeout=900, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(repeats: int, busy: bool, exporter: str, ort_int8: bool, threads: int) -> dict:
    from label_studio_sam2.engine.models import random_model, real_config
    from label_studio_sam2.engine.openvino_encoder import _FPN
    from label_studio_sam2.engine.transforms import preprocess

    cpu, load_before = machine()
    torch.manual_seed(0)
    base = random_model(real_config(), "image", cpu_precision="fp32")
    assert base.image_size == 1024
    rgb = np.array(Image.open(io.BytesIO(photo(1024, 768, 0))).convert("RGB"))
    pixels = preprocess(rgb, base.image_size)
    fpn = _FPN(base.model.vision_encoder).eval()
    work = Path(tempfile.mkdtemp(prefix="encoder-runtimes-"))
    r = {
        "model": "random sam2.1 hiera-tiny (real architecture), vision encoder (Hiera + FPN) only",
        "image": "1024x768 photo -> 1024 px input",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "load_before": load_before,
        "repeats": repeats,
        "versions": {"torch": torch.__version__},
        "rows": [],
        "rss_mb_torch_model_loaded": round(rss_mb()),
    }
    calls = []  # (row, fn(pixels) -> FPN levels)

    def add(row: dict, fn) -> None:
        before = row.pop("rss_mb_before_setup", None) or rss_mb()
        row["quiet_s"] = round(best_of(lambda: fn(pixels), repeats), 3)
        row["rss_mb_after"] = round(rss_mb())
        row["rss_mb_added"] = round(row["rss_mb_after"] - before)
        r["rows"].append(row)
        calls.append((row, fn))

    torch_fp32, torch_bf16 = torch_encoders(fpn)
    add({"runtime": "torch", "precision": "fp32"}, torch_fp32)
    add({"runtime": "torch", "precision": "bf16"}, torch_bf16)

    try:
        import openvino as ov

        from label_studio_sam2.engine.openvino_encoder import load_openvino_encoder

        r["versions"]["openvino"] = ov.__version__
        for precision in ("f32", "bf16"):
            row = {"runtime": "openvino", "precision": precision, "rss_mb_before_setup": round(rss_mb())}
            start = time.perf_counter()
            encoder = load_openvino_encoder(
                base.model.vision_encoder, "bench", 1024, precision, threads, cache_dir=work / "openvino"
            )
            row["setup_s"] = round(time.perf_counter() - start, 2)
            row["setup"] = "convert_model + save + compile (empty cache)"
            row["artefact"] = str(work / "openvino")
            add(row, encoder.infer)
    except ImportError as e:
        print(f"OpenVINO rows skipped: {e}")
        r["openvino_skipped"] = str(e)

    missing = onnxruntime_missing()
    if missing:
        print(f"ONNX Runtime rows skipped (onnxruntime/onnx/onnxscript do not import: {missing})")
        r["onnxruntime_skipped"] = missing
    else:
        ort = optional("onnxruntime")
        r["versions"].update(onnxruntime=ort.__version__, exporter=exporter)
        path = work / "encoder.onnx"
        row = {"runtime": "onnxruntime", "precision": "fp32", "rss_mb_before_setup": round(rss_mb())}
        try:
            start = time.perf_counter()
            export_onnx(fpn, pixels, path, exporter)
            row["export_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            session = ort_session(path, threads)
            row["session_s"] = round(time.perf_counter() - start, 2)
            row["setup_s"] = round(row["export_s"] + row["session_s"], 2)
            row["setup"] = f"torch.onnx.export ({exporter}) + InferenceSession (optimisation ALL)"
            row["artefact"] = str(path)
        except Exception as e:  # an export the exporter cannot do: reported, the rest still runs
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            r["rows"].append(row)
            session = None
        if session is not None:
            name = session.get_inputs()[0].name
            add(row, lambda x, s=session: s.run(None, {name: x.numpy()}))
            if ort_int8:
                ortq = optional("onnxruntime.quantization")
                row = {
                    "runtime": "onnxruntime",
                    "precision": "int8 dynamic",
                    "rss_mb_before_setup": round(rss_mb()),
                }
                try:
                    start = time.perf_counter()
                    ortq.quantize_dynamic(
                        str(path),
                        str(work / "encoder-int8.onnx"),
                        weight_type=ortq.QuantType.QInt8,
                        op_types_to_quantize=["MatMul"],
                        use_external_data_format=True,
                    )
                    s8 = ort_session(work / "encoder-int8.onnx", threads)
                    row["setup_s"] = round(time.perf_counter() - start, 2)
                    row["setup"] = "quantize_dynamic (MatMul, QInt8) + InferenceSession"
                    row["artefact"] = str(work / "encoder-int8.onnx")
                    add(row, lambda x, s=s8: s.run(None, {name: x.numpy()}))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    r["rows"].append(row)

    ref = torch_fp32(pixels)
    for row, fn in calls:
        row["rel_l2_vs_torch_fp32"] = rel_l2(fn(pixels), ref)
    t_ref = r["rows"][0]["quiet_s"]
    for row, _ in calls:
        row["speedup_vs_torch_fp32"] = round(t_ref / row["quiet_s"], 2)
    if busy:
        _, r["load_before_busy"] = machine()
        neighbours = busy_neighbours(2)
        try:
            time.sleep(2)  # let them get going
            for row, fn in calls:
                row["busy_s"] = round(best_of(lambda fn=fn: fn(pixels), repeats), 3)
            _, r["load_during_busy"] = machine()
        finally:
            for proc in neighbours:
                proc.terminate()
        b_ref = r["rows"][0]["busy_s"]
        for row, _ in calls:
            row["busy_speedup_vs_torch_fp32"] = round(b_ref / row["busy_s"], 2)
    for row, _ in calls:  # each runtime's memory in a process of its own
        try:
            row["fresh_process_rss_mb"] = fresh_rss(
                row["runtime"], row["precision"], row.get("artefact", "-"), threads
            )
        except (subprocess.SubprocessError, ValueError) as e:
            row["fresh_process_rss_mb"] = {"error": f"{type(e).__name__}: {e}"}
    _, r["load_after"] = machine()
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="best of N (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime")
    p.add_argument("--busy", action="store_true", help="also time beside two CPU-bound processes")
    p.add_argument(
        "--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="torch.onnx.export's"
    )
    p.add_argument("--ort-int8", action="store_true", help="also ONNX Runtime's dynamic int8 quantisation")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument(
        "--rss-child", nargs=3, metavar=("RUNTIME", "PRECISION", "ARTEFACT"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    r = run(args.repeats, args.busy, args.exporter, args.ort_int8, args.threads)
    rows = [("machine", r["cpu"], f"load average before {r['load_before']}, after {r['load_after']}")]
    if args.busy:
        rows.append(("busy", "2 procs", f"load average during {r.get('load_during_busy')}"))
    rows.append(("cpu flags", "", " ".join(r["cpu_flags"])))
    rows.append(("versions", "", ", ".join(f"{k} {v}" for k, v in r["versions"].items())))
    for key in ("openvino_skipped", "onnxruntime_skipped"):
        if key in r:
            rows.append((key.replace("_", " "), "", r[key]))
    for row in r["rows"]:
        name = f"{row['runtime']} {row['precision']}"
        if "error" in row:
            rows.append((name, "failed", row["error"]))
            continue
        errs = "/".join(f"{e:.1e}" for e in row["rel_l2_vs_torch_fp32"])
        note = f"x{row['speedup_vs_torch_fp32']:.2f} vs torch fp32; rel-L2 {errs}; "
        fresh = row.get("fresh_process_rss_mb", {})
        if "VmRSS" in fresh:
            note += f"RSS of a process of its own {fresh['VmRSS']} MB (peak {fresh['VmHWM']})"
        else:
            note += f"RSS here {row['rss_mb_after']} MB (+{row['rss_mb_added']})"
        rows.append((f"{name} quiet", f"{row['quiet_s']:.3f} s", note))
        if "busy_s" in row:
            rows.append(
                (f"{name} busy", f"{row['busy_s']:.3f} s", f"x{row['busy_speedup_vs_torch_fp32']:.2f}")
            )
        if "setup_s" in row:
            rows.append(("  first start", f"{row['setup_s']:.1f} s", row["setup"]))
    report(r, rows, args.out, value_width=12)


if __name__ == "__main__":
    main()
