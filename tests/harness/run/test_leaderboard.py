import csv
import io

from harness.run.leaderboard import IDENTITY, MEASURED, fmt, render_csv


def record(key, method, latency, flops, status="ok", params="{}", speedup=None):
    cell = {"model": "tiny-sd", "weights": "none", "method": method, "params": params,
            "prompts": "shapes", "n_images": 4, "steps": 10, "guidance": 5.0, "resolution": 32,
            "seed": 0, "dtype": "float32", "device": "cpu", "batch_size": 2}
    metrics = ({"latency_s": latency, "flops_per_image": flops, "speedup": speedup}
               if status == "ok" else {})
    return {"key": key, "baseline_key": "base", "cell": cell, "status": status,
            "error": "" if status == "ok" else "RuntimeError: boom", "metrics": metrics,
            "environment": {"device_name": "cpu", "torch": "2.13.0"}, "images_sha": "ab",
            "effective_steps": 10, "note": ""}


def rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_speedup_is_the_cells_paired_measurement_and_flops_ratio_is_against_baseline():
    """Speedup comes from the cell's own paired rounds, never from two cells' latencies."""
    text = render_csv([record("dc", "deepcache", 0.05, 600.0, params='{"interval":3}',
                              speedup=1.5),
                       record("base", "baseline", 0.1, 1000.0, speedup=0.99)])
    base, dc = rows(text)
    assert base["method"] == "baseline" and base["speedup"] == "0.9900"
    assert dc["speedup"] == "1.5000" and dc["flops_ratio"] == "0.6000"
    assert dc["latency_s"] == "0.050000" and dc["flops_per_image"] == "600"
    assert base["compile"] == ""  # a record from before the compile axis


def test_failed_cell_is_a_row_with_its_error_and_no_ratios():
    text = render_csv([record("base", "baseline", 0.1, 1000.0),
                       record("x", "deepcache", None, None, status="error")])
    failed = rows(text)[1]
    assert failed["status"] == "error" and failed["error"] == "RuntimeError: boom"
    assert failed["speedup"] == "" and failed["latency_s"] == "" and failed["flops_ratio"] == ""


def test_columns_start_with_identity_and_order_is_stable():
    recs = [record("base", "baseline", 0.1, 1000.0), record("a", "solver", 0.2, 10.0),
            record("b", "deepcache", 0.3, 20.0)]
    text = render_csv(recs)
    assert text == render_csv(list(reversed(recs)))
    header = text.splitlines()[0].split(",")
    assert header[: len(IDENTITY)] == list(IDENTITY)
    assert [r["method"] for r in rows(text)] == ["baseline", "deepcache", "solver"]


def test_fixed_formats():
    assert fmt("latency_s", 0.1234567) == "0.123457"
    assert fmt("unknown", 1 / 3) == "0.333333" and fmt("x", None) == "" and fmt("x", True) == "true"
    assert fmt("weight_bytes_quantized", 1513490) == "1513490"  # counts in full, not 1.51349e+06
    assert "flops_per_image" not in MEASURED
